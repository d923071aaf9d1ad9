import json
import re

import pytest
import torch
import torch.nn.functional as F

from bertds import encode, load_pretrained
from bertds.engine import load_ds_config, resolve_batch_sizes
from bertds.errors import UserError
from bertds.model import BertForPreTraining, get_config

SEED_LINES = (
    re.compile(r"^MLM loss \d+\.\d{3}, NSP loss \d+\.\d{3}$", re.M),
    re.compile(r"^\d+\.\d sentence pairs/sec on \[(cpu|cuda:\d+)(, (cpu|cuda:\d+))*\]$", re.M),
)


def read_metrics(output_dir):
    """The training records (held-out evaluations have a "split")."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "split" not in r]


# --- batch arithmetic and config ------------------------------------------------------------------------------


def test_global_batch_is_split_over_ranks():
    config = resolve_batch_sizes({"train_batch_size": 512}, world_size=2)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (256, 1)
    config = resolve_batch_sizes({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 2)
    assert config["train_batch_size"] == 64
    config = resolve_batch_sizes({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2)
    assert config["gradient_accumulation_steps"] == 4
    assert (
        resolve_batch_sizes({"train_batch_size": 512, "train_micro_batch_size_per_gpu": 4}, 1, batch_size=96)[
            "train_micro_batch_size_per_gpu"
        ]
        == 96
    )


@pytest.mark.parametrize(
    "config,world,message",
    [
        (
            {"train_batch_size": 100},
            3,
            "train_batch_size 100 is not divisible by gradient_accumulation_steps 1 × world "
            "size 3; choose a batch size that is a multiple of 3",
        ),
        (
            {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 6},
            2,
            "not divisible by micro batch 6 × world size 2",
        ),
        (
            {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2},
            2,
            r"train_batch_size 64 != micro batch 8 × gradient accumulation 2 × world size 2 = 32",
        ),
        ({}, 1, "sets neither train_batch_size nor train_micro_batch_size_per_gpu"),
    ],
)
def test_inconsistent_batch_sizes_name_the_numbers(config, world, message):
    with pytest.raises(UserError, match=message):
        resolve_batch_sizes(config, world)


def test_malformed_or_missing_ds_config_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,}')
    with pytest.raises(UserError, match=r"not valid JSON .* line 1"):
        load_ds_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_ds_config(tmp_path / "none.json")


@pytest.mark.parametrize(
    "section, kind, message",
    [
        ("optimizer", "Adamm", "unknown optimizer type 'Adamm'; did you mean 'Adam'?"),
        ("optimizer", "adamw", None),  # DeepSpeed reads optimizer types case-insensitively
        ("scheduler", "WarmupDecayLRR", "unknown scheduler type 'WarmupDecayLRR'; did you mean 'WarmupDecayLR'?"),
        ("scheduler", "Noam", "unknown scheduler type 'Noam'; choose one of "),
        ("scheduler", "CosineAnnealingLR", None),  # torch's schedules are DeepSpeed's too
    ],
)
def test_a_misspelt_optimizer_or_scheduler_type_is_one_user_error_with_a_did_you_mean(tmp_path, section, kind, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, section: {"type": kind, "params": {}}}))
    if message is None:
        assert load_ds_config(path)[section]["type"] == kind
        return
    with pytest.raises(UserError) as refused:
        load_ds_config(path)
    assert str(refused.value).startswith(f"DeepSpeed config {path}: {message}")


@pytest.mark.parametrize("return_logits", [True, False])
def test_pretraining_loss_ignores_padded_prediction_slots(return_logits):
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=7, dropout=0.0, attention_dropout=0.0)).eval()
    batch = {
        "tokens": torch.tensor([[3, 5, 6, 4, 1], [3, 6, 4, 5, 4]]),
        "segments": torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]),
        "valid_len": torch.tensor([4, 5]),
        "pred_positions": torch.tensor([[1, 2, 0], [3, 0, 0]]),
        "mlm_labels": torch.tensor([[1, 2, 0], [3, 0, 0]]),
        "mlm_weights": torch.tensor([[1.0, 1, 0], [1, 0, 0]]),
        "nsp_label": torch.tensor([1, 0]),
    }
    out = model(**batch, return_logits=return_logits)
    logits = model(**{k: batch[k] for k in ("tokens", "segments", "valid_len", "pred_positions")}).prediction_logits
    nsp_logits = out.seq_relationship_logits
    expected = torch.stack(
        [
            F.cross_entropy(logits[0, 0:1], batch["mlm_labels"][0, 0:1]),
            F.cross_entropy(logits[0, 1:2], batch["mlm_labels"][0, 1:2]),
            F.cross_entropy(logits[1, 0:1], batch["mlm_labels"][1, 0:1]),
        ]
    ).mean()
    torch.testing.assert_close(out.mlm_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.nsp_loss, F.cross_entropy(nsp_logits, batch["nsp_label"]))
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)
    assert out.mlm_count.item() == 3
    assert out.mlm_correct.item() == sum(
        logits[r, s].argmax().item() == batch["mlm_labels"][r, s].item() for r, s in ((0, 0), (0, 1), (1, 0))
    )
    assert out.nsp_correct.item() == (nsp_logits.argmax(-1) == batch["nsp_label"]).sum().item()


# --- real launches ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_run(launch, wikitext_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("two-ranks")
    result = launch(
        "pretrain.py",
        "--data-dir",
        str(wikitext_dir),
        "--output-dir",
        str(output_dir),
        "--max-steps",
        "8",
        "--batch-size",
        "128",
        "--log-interval",
        "1",
        nproc=2,
    )
    assert result.returncode == 0, result.log[-3000:]
    return output_dir, result.log


def test_two_ranks_train_and_loss_decreases(two_rank_run):
    output_dir, log = two_rank_run
    assert all(p.search(log) for p in SEED_LINES), log[-2000:]
    assert "sentence pairs/sec on [cpu, cpu]" in log
    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["mlm_loss"] < metrics[0]["mlm_loss"] - 1.0
    saved = json.loads((output_dir / "train_config.json").read_text())
    assert saved["deepspeed"]["train_micro_batch_size_per_gpu"] == 64


def test_single_rank_default_run(launch, wikitext_dir, tmp_path):
    # Every default (tiny, global batch 512, max_len 64, Adam lr 0.01) but 4 steps instead of 50, for time.
    result = launch(
        "pretrain.py",
        "--data-dir",
        str(wikitext_dir),
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "4",
        "--log-interval",
        "2",
        nproc=1,
    )
    assert result.returncode == 0, result.log[-3000:]
    assert all(p.search(result.log) for p in SEED_LINES) and "sentence pairs/sec on [cpu]" in result.log
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["train"]["model"] == "tiny" and saved["train"]["data"]["max_len"] == 64
    assert saved["deepspeed"]["train_batch_size"] == 512
    assert saved["deepspeed"]["optimizer"]["params"]["lr"] == 0.01
    assert [m["step"] for m in read_metrics(tmp_path)] == [2, 4]


def test_saved_model_loads_back_and_encodes(two_rank_run):
    model, vocab = load_pretrained(two_rank_run[0])
    assert model.config.hidden_size == 128 and len(vocab) == model.config.vocab_size
    single = encode(model, vocab, ["a", "crane", "is", "flying"])
    assert single.shape == (1, 6, 128)
    pair = encode(model, vocab, "a crane driver came", "he just left")
    assert pair.shape == (1, 10, 128)
    torch.testing.assert_close(encode(model, vocab, "a crane driver came", "he just left"), pair)
    crane_flying, crane_driver = single[0, 2], pair[0, 2]
    assert not torch.allclose(crane_flying, crane_driver)  # context changes the representation


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--data-dir", "/nonexistent/wikitext"],
            "data directory /nonexistent/wikitext does not exist; pass --data-dir",
        ),
        (["--model", "huge"], "unknown model 'huge'; choose one of tiny, small, base, large"),
        (["--max-len", "1024"], "--max-len 1024 exceeds the model's 512 positions"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(launch, wikitext_dir, tmp_path, args, message):
    base = ["--data-dir", str(wikitext_dir), "--output-dir", str(tmp_path / "out")]
    result = launch("pretrain.py", *base, *args)
    assert result.returncode == 2, result.log[-2000:]
    assert f"error: {message}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_json_config_exits_2(launch, wikitext_dir, tmp_path):
    config = tmp_path / "broken.json"
    config.write_text('{"train_batch_size": 512')
    result = launch("pretrain.py", "--data-dir", str(wikitext_dir), "--deepspeed_config", str(config))
    assert result.returncode == 2 and f"error: DeepSpeed config {config} is not valid JSON" in result.stderr
