import json
from dataclasses import asdict, fields
from pathlib import Path

import deepspeed
import pytest
import torch
import transformers

from bertds import BertForPreTraining, UserError, Vocab, get_config, save_pretrained
from bertds.data import DataConfig
from bertds.encode import pack
from bertds.engine.train import TrainConfig
from bertds.export import load_checkpoint
from bertds.export import main as export_main
from bertds.hf import CONFIG_NAMES, from_hf_config, load_hf_pretrained, save_hf, to_hf_config, to_hf_state_dict
from bertds.model import BertConfig
from tests.conftest import wordpiece_vocab
from tests.hf_loading import LEGACY_PYTHON, legacy_report, report

SENTENCES = ["a crane is flying over the river", "a crane driver came", "he just left", "the river is wide"]


def random_model(
    tie: bool = True, seed: int = 0, vocab: Vocab | None = None, **config
) -> tuple[BertForPreTraining, Vocab]:
    """A tiny model whose every weight (LayerNorms and biases included) is far from its initial value, so that a
    weight mapped to the wrong place changes the logits."""
    vocab = vocab or Vocab.train_word_level(SENTENCES, min_freq=1)
    torch.manual_seed(seed)
    model = BertForPreTraining(
        get_config("tiny", vocab_size=len(vocab), pad_token_id=vocab.pad_id, tie_word_embeddings=tie, **config)
    )
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
    torch.testing.assert_close(hf_nsp, nsp.flip(-1), atol=1e-4, rtol=0)  # Hugging Face: 0 = B continues A

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
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    } <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert_round_trip(model, vocab, tmp_path / "hf")


def test_every_model_config_field_round_trips_through_a_hugging_face_config_json(tmp_path):
    assert set(CONFIG_NAMES) == {f.name for f in fields(BertConfig)}
    config = BertConfig(
        vocab_size=99,
        hidden_size=48,
        num_layers=3,
        num_heads=4,
        ffn_size=80,
        max_position_embeddings=40,
        type_vocab_size=3,
        dropout=0.05,
        attention_dropout=0.15,
        layer_norm_eps=1e-6,
        initializer_range=0.03,
        tie_word_embeddings=False,
        pad_token_id=7,
        sentence_loss=False,
    )
    changed = {f.name for f in fields(BertConfig) if getattr(config, f.name) != f.default}
    assert changed == set(CONFIG_NAMES) - {"pre_layernorm"}  # a pre-LN model is refused (test below)
    to_hf_config(config).save_pretrained(tmp_path)
    assert from_hf_config(transformers.BertConfig.from_pretrained(tmp_path), str(tmp_path)) == config
    standard = transformers.BertConfig()  # bert-base-uncased's config.json: no bertds fields, bertds' defaults
    assert from_hf_config(standard, "bert-base-uncased") == BertConfig()


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_checkpoint_is_consolidated_and_exported(process_group, tmp_path, stage):
    model, vocab = random_model()
    config = {
        "train_batch_size": 4,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batch = random_batch(len(vocab))
    engine.train()
    out = engine(
        batch["tokens"],
        batch["segments"],
        batch["valid_len"],
        torch.arange(3).expand(4, 3),
        nsp_label=torch.tensor([0, 1, 0, 1]),
    )
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
        module = torch.load(checkpoints / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)[
            "module"
        ]
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


def test_exported_next_sentence_head_agrees_with_bertds_on_which_pairs_follow(tmp_path):
    model, vocab = random_model()
    batch = random_batch(len(vocab))
    with torch.no_grad():  # a bias that puts two of the four pairs on each side
        margin = bertds_logits(model, batch)[1] @ torch.tensor([-1.0, 1.0])
        model.nsp.seq_relationship.bias[1] -= margin.sort().values[1:3].mean()
    save_hf(model, vocab, tmp_path / "hf")
    follows = bertds_logits(model, batch)[1].argmax(-1) == 1  # bertds: 1 = B follows A
    assert 0 < follows.sum() < len(follows)  # both answers occur, so a head read the other way round shows
    hf_model = transformers.BertForNextSentencePrediction.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        hf_out = hf_model(
            input_ids=batch["tokens"],
            token_type_ids=batch["segments"],
            attention_mask=batch["mask"],
            labels=(~follows).long(),
        )  # Hugging Face: 0 = continues
        ours = model(batch["tokens"], batch["segments"], batch["valid_len"], nsp_label=follows.long())
    assert torch.equal(hf_out.logits.argmax(-1) == 0, follows)
    torch.testing.assert_close(hf_out.loss, ours.nsp_loss, atol=1e-5, rtol=0)


def test_a_pre_layernorm_model_is_neither_exported_nor_imported(tmp_path, capsys):
    model, vocab = random_model(pre_layernorm=True)
    save_pretrained(model.state_dict(), model.config, vocab, tmp_path / "run")
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'run'} is a pre-LayerNorm model (--pre-ln)")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    post_ln, _ = random_model()
    save_hf(post_ln, vocab, tmp_path / "marked")
    config = json.loads((tmp_path / "marked" / "config.json").read_text())
    (tmp_path / "marked" / "config.json").write_text(json.dumps({**config, "pre_layernorm": True}))
    with pytest.raises(UserError, match="is a pre-LayerNorm model"):
        load_hf_pretrained(tmp_path / "marked")


# d2l-recipe words, punctuation, digits, accents and case, where BERT's basic tokenizer splits otherwise.
TEXTS = [
    ("A Crane Is Flying.", None),
    ("1,000 cafés", "he just LEFT"),
    ("a crane driver came", "the river is wide"),
    ("Cranes are flying!", "a crane driver"),
    ("the river's crane", "he (just) left"),
    ("café", "naïve über"),
]
TRAINED_MAX_LEN = 64


def run_record(max_len: int) -> dict:
    """A train_config.json as launcher/pretrain.py writes it, with held-out figures in its result."""
    train = TrainConfig(
        deepspeed_config="ds_configs/tiny_cpu.json",
        max_steps=200,
        lr=1e-3,
        data=DataConfig(data_dir="../shared/data/wikitext-2", max_len=max_len),
    )
    return {
        "train": asdict(train),
        "deepspeed": {"train_batch_size": 128},
        "result": {
            "mlm_loss": 5.125,
            "nsp_loss": 0.625,
            "steps": 200,
            "eval": {"mlm_accuracy": 0.3125, "nsp_accuracy": 0.75},
        },
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Word-level and WordPiece runs (with their train_config.json), exported: kind -> (dir, model, vocab)."""
    exported = {}
    for kind, vocab in (("word", None), ("wordpiece", wordpiece_vocab())):
        model, vocab = random_model(vocab=vocab)
        run, out = tmp_path_factory.mktemp(f"{kind}-run"), tmp_path_factory.mktemp(f"{kind}-hf")
        save_pretrained(model.state_dict(), model.config, vocab, run)
        (run / "train_config.json").write_text(json.dumps(run_record(TRAINED_MAX_LEN)))
        assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
        exported[kind] = out, model, vocab
    return exported


def bertds_pair_logits(model: BertForPreTraining, vocab: Vocab, a: str, b: str) -> tuple[torch.Tensor, ...]:
    ids, segments = pack(vocab, a, b)
    with torch.no_grad():
        out = model(
            torch.tensor([ids]), torch.tensor([segments]), torch.tensor([len(ids)]), torch.arange(len(ids))[None]
        )
    return out.prediction_logits[0], out.seq_relationship_logits[0]


@pytest.mark.parametrize("python", ["current", "legacy"])
@pytest.mark.parametrize("kind", ["word", "wordpiece"])
def test_every_documented_way_to_load_the_export_gives_bertds_ids_and_logits(exports, kind, python):
    if python == "legacy" and not LEGACY_PYTHON:
        pytest.skip("BERTDS_HF_LEGACY_PYTHON is not set (.ci/run builds a transformers 4.57 environment)")
    directory, model, vocab = exports[kind]
    masked = f"a crane is {vocab.special_tokens['mask']}"
    request = {"texts": TEXTS, "model": "BertForPreTraining", "fill_mask": masked}
    result = report(str(directory), request) if python == "current" else legacy_report(directory, request)
    legacy = result["version"].startswith("4.")
    assert legacy == (python == "legacy")
    expected = [pack(vocab, a, b) for a, b in TEXTS]
    right = {"AutoTokenizer", "PreTrainedTokenizerFast"}
    if kind == "wordpiece":  # BERT's own pipeline: every class rebuilds it exactly
        right |= {"BertTokenizerFast", "BertTokenizer"}
    elif legacy:  # 4.x: BertTokenizerFast reads tokenizer.json; the slow BertTokenizer finds no vocab.txt
        right.add("BertTokenizerFast")
        assert "error" in result["tokenizers"]["BertTokenizer"]
    for name in right:
        loaded = result["tokenizers"][name]
        assert "error" not in loaded, f"{name}: {loaded.get('error')}"
        assert list(zip(loaded["input_ids"], loaded["token_type_ids"])) == [tuple(e) for e in expected], name
        assert loaded["model_max_length"] == TRAINED_MAX_LEN
    pairs = [(a, b) for a, b in TEXTS if b is not None]
    for row, (a, b) in enumerate(pairs):
        mlm, nsp = bertds_pair_logits(model, vocab, a, b)
        n = len(mlm)
        torch.testing.assert_close(
            torch.tensor(result["model"]["logits"]["prediction_logits"][row])[:n], mlm, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(result["model"]["logits"]["seq_relationship_logits"][row]), nsp.flip(-1), atol=1e-4, rtol=0
        )
    ids, _ = pack(vocab, "a crane is")
    ids.insert(-1, vocab.mask_id)  # <cls> a crane is <mask> <sep>
    with torch.no_grad():
        out = model(
            torch.tensor([ids]),
            torch.zeros(1, len(ids), dtype=torch.long),
            torch.tensor([len(ids)]),
            torch.tensor([[ids.index(vocab.mask_id)]]),
        )
    assert result["fill_mask"] == out.prediction_logits[0, 0].topk(3).indices.tolist()


def test_export_writes_tokenizer_metadata_and_a_model_card(exports):
    word, _, word_vocab = exports["word"]
    wordpiece, _, wordpiece_vocab_ = exports["wordpiece"]
    for directory, vocab in ((word, word_vocab), (wordpiece, wordpiece_vocab_)):
        special = json.loads((directory / "special_tokens_map.json").read_text())
        assert special == {f"{role}_token": token for role, token in vocab.special_tokens.items()}
    assert json.loads((word / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (word / "vocab.txt").exists()  # nothing for BERT's tokenizer to rebuild the wrong pipeline from
    by_id = sorted(wordpiece_vocab_.tokenizer.get_vocab(), key=wordpiece_vocab_.tokenizer.token_to_id)
    assert (wordpiece / "vocab.txt").read_text().splitlines() == by_id
    card = (word / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: fill-mask\n")
    for fact in (
        "2 layers, hidden 128, 2 heads, FFN 256",
        "WikiText-2 (../shared/data/wikitext-2)",
        "| recipe | d2l",
        "| max_len | 64 tokens",
        "| steps | 200 |",
        "| global batch | 128 |",
        "MLM 5.125, NSP 0.625",
        "| held-out eval.mlm_accuracy | 0.3125 |",
        "| held-out eval.nsp_accuracy | 0.7500 |",
        f'AutoTokenizer.from_pretrained("{word}")',
        "Do not use `BertTokenizer` / `BertTokenizerFast`",
        "index 0: B continues A",
    ):
        assert fact in card, fact
    assert "Any of `AutoTokenizer`, `BertTokenizerFast`" in (wordpiece / "README.md").read_text()


def test_push_to_hub_uploads_the_exported_directory(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model, vocab = random_model()
    save_pretrained(model.state_dict(), model.config, vocab, tmp_path / "run")
    assert (
        export_main(
            [
                "--checkpoint",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "hf"),
                "--push-to-hub",
                "someone/bertds-tiny",
            ]
        )
        == 0
    )
    assert calls[0] == ("create_repo", "someone/bertds-tiny", True)
    assert calls[1][:2] == ("upload_folder", "someone/bertds-tiny") and "model.safetensors" in calls[1][2]
    assert 'from_pretrained("someone/bertds-tiny")' in (tmp_path / "hf" / "README.md").read_text()
