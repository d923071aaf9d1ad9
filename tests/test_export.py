import deepspeed
import pytest
import torch
import torch.nn.functional as F
import transformers

from bertds import BertForPreTraining, UserError, Vocab, get_config, save_pretrained
from bertds.encode import pack
from bertds.export import load_checkpoint, main as export_main
from bertds.hf import load_hf_pretrained, to_hf_state_dict

SENTENCES = ["a crane is flying over the river", "a crane driver came", "he just left", "the river is wide"]


def random_model(tie: bool = True, seed: int = 0) -> tuple[BertForPreTraining, Vocab]:
    """A tiny model whose every weight (LayerNorms and biases included) is far from its initial value, so that a
    weight mapped to the wrong place changes the logits."""
    vocab = Vocab.train_word_level(SENTENCES, min_freq=1)
    torch.manual_seed(seed)
    model = BertForPreTraining(get_config("tiny", vocab_size=len(vocab), pad_token_id=vocab.pad_id,
                                          tie_word_embeddings=tie))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval(), vocab


def random_batch(vocab_size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Four pairs with both segments and padding (valid lengths 12, 7, 9, 5 of 12)."""
    generator = torch.Generator().manual_seed(seed)
    valid_len = torch.tensor([12, 7, 9, 5])
    positions = torch.arange(12)
    valid = positions[None, :] < valid_len[:, None]
    tokens = torch.randint(5, vocab_size, (4, 12), generator=generator).masked_fill(~valid, 1)  # 1: <pad>
    segments = ((positions[None, :] >= torch.tensor([6, 3, 4, 2])[:, None]) & valid).long()
    return {"tokens": tokens, "segments": segments, "valid_len": valid_len, "mask": valid.long()}


def bertds_logits(model: BertForPreTraining, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        all_positions = torch.arange(batch["tokens"].shape[1]).expand_as(batch["tokens"])
        out = model(batch["tokens"], batch["segments"], batch["valid_len"], all_positions)
    return out.prediction_logits, out.seq_relationship_logits


def hf_logits(hf_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = hf_model(input_ids=batch["tokens"], token_type_ids=batch["segments"], attention_mask=batch["mask"])
    return out.prediction_logits, out.seq_relationship_logits


def assert_round_trip(model: BertForPreTraining, vocab: Vocab, hf_dir) -> None:
    """transformers' logits equal bertds' within 1e-4; imported back, bertds' logits equal within 1e-5."""
    batch = random_batch(len(vocab))
    mlm, nsp = bertds_logits(model, batch)
    assert mlm.std() > 0.3 and nsp.std() > 0.1  # logits that a mis-mapped weight would visibly change
    hf_model = transformers.BertForPreTraining.from_pretrained(str(hf_dir)).eval()
    assert set(hf_model.state_dict()) == set(to_hf_state_dict(model.state_dict(), model.config))  # every weight
    hf_mlm, hf_nsp = hf_logits(hf_model, batch)
    torch.testing.assert_close(hf_mlm, mlm, atol=1e-4, rtol=0)
    torch.testing.assert_close(hf_nsp, nsp, atol=1e-4, rtol=0)

    imported, imported_vocab = load_hf_pretrained(hf_dir)
    assert imported.config == model.config
    assert imported_vocab.tokenizer.get_vocab() == vocab.tokenizer.get_vocab()
    assert imported_vocab.special_tokens == vocab.special_tokens
    back_mlm, back_nsp = bertds_logits(imported, batch)
    torch.testing.assert_close(back_mlm, mlm, atol=1e-5, rtol=0)
    torch.testing.assert_close(back_nsp, nsp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_and_import_round_trip_of_a_finished_run(tmp_path, tie):
    model, vocab = random_model(tie)
    save_pretrained(model.state_dict(), model.config, vocab, tmp_path / "run")
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in (tmp_path / "hf").iterdir()}
    assert_round_trip(model, vocab, tmp_path / "hf")


def test_exported_tokenizer_packs_pairs_as_bertds(tmp_path):
    model, vocab = random_model()
    save_pretrained(model.state_dict(), model.config, vocab, tmp_path / "run")
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    encoded = tokenizer("A crane is flying", "he just LEFT")
    ids, segments = pack(vocab, "A crane is flying", "he just LEFT")
    assert encoded["input_ids"] == ids and encoded["token_type_ids"] == segments
    by_id = sorted(vocab.tokenizer.get_vocab(), key=vocab.tokenizer.token_to_id)
    assert (tmp_path / "hf" / "vocab.txt").read_text().splitlines() == by_id


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_checkpoint_is_consolidated_and_exported(process_group, tmp_path, stage):
    model, vocab = random_model()
    config = {"train_batch_size": 4, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batch = random_batch(len(vocab))
    engine.train()
    out = engine(batch["tokens"], batch["segments"], batch["valid_len"], torch.arange(3).expand(4, 3),
                 nsp_label=torch.tensor([0, 1, 0, 1]))
    engine.backward(out.prediction_logits.float().logsumexp(-1).mean() + out.nsp_loss)
    engine.step()  # the checkpoint then holds trained weights, not the ones of random_model
    checkpoints, tag = tmp_path / "run" / "checkpoints", "step00000001"
    engine.save_checkpoint(str(checkpoints), tag=tag)  # writes `latest`, as bertds' training checkpoints
    vocab.save(checkpoints / tag)
    model.config.save(checkpoints / tag / "config.json")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if stage == 3:  # the module file alone lacks the weights: consolidation is what makes the export work
        assert (checkpoints / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
        module = torch.load(checkpoints / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                            weights_only=False)["module"]
        assert module["bert.pooler.dense.weight"].numel() < trained["bert.pooler.dense.weight"].numel()
    reference = BertForPreTraining(model.config)
    reference.load_state_dict(trained)
    reference.eval()

    loaded, _ = load_checkpoint(tmp_path / "run")
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], atol=0, rtol=0)
    assert export_main(["--checkpoint", str(checkpoints), "--out", str(tmp_path / "hf")]) == 0
    assert_round_trip(reference, vocab, tmp_path / "hf")


def test_export_of_a_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint {tmp_path / 'nothing'} does not exist")
    (tmp_path / "empty").mkdir()
    assert export_main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "hf")]) == 2
    assert "is neither a finished bertds run" in capsys.readouterr().err


def test_finetuning_starts_from_a_hugging_face_directory(tmp_path):
    from bertds.hf import save_hf
    from bertds.tasks.finetune import FinetuneConfig, load_backbone
    model, vocab = random_model()
    save_hf(model, vocab, tmp_path / "hf")
    source = FinetuneConfig(deepspeed_config="unused", init_from_hf=str(tmp_path / "hf"))
    backbone, backbone_vocab = load_backbone(source)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[name], tensor, atol=0, rtol=0)
    assert backbone_vocab.tokenizer.get_vocab() == vocab.tokenizer.get_vocab()
    with pytest.raises(UserError, match="pass exactly one of --checkpoint RUN"):
        load_backbone(FinetuneConfig(deepspeed_config="unused", checkpoint="run", init_from_hf=str(tmp_path / "hf")))
