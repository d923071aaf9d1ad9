"""Held-out evaluation (bertds/evaluate.py), the recipe switches (--sentence-task none, --mask-prob, --pre-ln) and
BERT's weight-decay groups."""

import json
import math
import subprocess

import deepspeed
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bertds.data import DataConfig, ExampleConfig, build_examples, resolve_corpus
from bertds.data.loader import table_columns
from bertds.engine.checkpoint import capture_rng
from bertds.engine.optim import adapt_optimization, parameter_groups
from bertds.engine.tracking import read_metrics
from bertds.evaluate import EvalConfig, heldout_data_config, score
from bertds.evaluate import main as evaluate_main
from bertds.model import BertForPreTraining, get_config, num_parameters
from bertds.pretrained import load_pretrained
from tests.conftest import REPO, launcher_env, torchrun_command
from tests.eval_worker import MICRO_BATCH, seeded_model

NUM_EXAMPLES = 9  # with micro batch 4 and 2 ranks: shares of 5 and 4, so one rank runs an extra forward
RUN_ARGS = ("--max-steps", "4", "--batch-size", "32", "--log-interval", "1", "--eval-examples", "64", "--no-wandb")


def direct_metrics(model, batch) -> dict:
    """The metrics computed plainly from the full logits of one batch."""
    model.eval()
    with torch.no_grad():
        out = model(**batch, return_logits=True)
    weights = batch["mlm_weights"].reshape(-1)
    ce = F.cross_entropy(out.prediction_logits.flatten(0, 1), batch["mlm_labels"].reshape(-1), reduction="none")
    right = out.prediction_logits.argmax(-1).reshape(-1) == batch["mlm_labels"].reshape(-1)
    nsp = out.seq_relationship_logits
    mlm_loss = float((ce * weights).sum() / weights.sum())
    return {
        "mlm_loss": mlm_loss,
        "mlm_accuracy": float((right * weights).sum() / weights.sum()),
        "perplexity": math.exp(mlm_loss),
        "nsp_loss": float(F.cross_entropy(nsp, batch["nsp_label"])),
        "nsp_accuracy": float((nsp.argmax(-1) == batch["nsp_label"]).float().mean()),
        "examples": len(batch["nsp_label"]),
    }


def assert_same_metrics(found: dict, expected: dict) -> None:
    assert found["examples"] == expected["examples"]
    for key in ("mlm_loss", "mlm_accuracy", "perplexity", "nsp_loss", "nsp_accuracy"):
        assert found[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.fixture(scope="module")
def small_set(prepared):
    examples = prepared.examples.select(range(NUM_EXAMPLES))
    columns = table_columns(examples.with_format("arrow")[:])
    batch = {
        k: torch.from_numpy(np.array(v, dtype=np.int64 if v.dtype.kind == "i" else v.dtype)) for k, v in columns.items()
    }
    return examples, batch, direct_metrics(seeded_model(len(prepared.vocab)), batch)


def test_metrics_equal_a_direct_computation_on_one_rank(small_set, prepared, process_group):
    examples, _, expected = small_set
    model = seeded_model(len(prepared.vocab))
    assert_same_metrics(score(model, examples, MICRO_BATCH, torch.device("cpu")), expected)
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    rng = capture_rng()
    assert_same_metrics(score(engine, examples, MICRO_BATCH, torch.device("cpu")), expected)
    # Evaluation changes no weight, no RNG stream and leaves the engine in training mode.
    assert engine.training
    assert all(torch.equal(weights[k], v) for k, v in engine.module.state_dict().items())
    after = capture_rng()
    assert torch.equal(rng["torch"], after["torch"]) and rng["python"] == after["python"]
    assert all(np.array_equal(a, b) for a, b in zip(rng["numpy"], after["numpy"]))


def test_metrics_equal_a_direct_computation_on_two_ranks_and_zero3(small_set, prepared, cache_dir):
    _, _, expected = small_set
    command = torchrun_command(str(REPO / "tests" / "eval_worker.py"), str(prepared.path), str(NUM_EXAMPLES), "0", "3")
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**launcher_env(cache_dir), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    found = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("METRICS ")]
    assert [m["stage"] for m in found] == [0, 3]
    for metrics in found:
        assert_same_metrics(metrics, expected)


def test_heldout_examples_use_the_training_recipe_with_masks_at_15_percent(tmp_path):
    train = DataConfig(
        data_dir="d",
        max_len=128,
        recipe="bert",
        mask_prob=0.3,
        seed=7,
        masking="dynamic",
        max_predictions=40,
        tokenizer="wordpiece",
    )
    manifest = {"max_len": 128, "recipe": "bert", "sentence_task": "sop", "whole_word_masking": True}
    config = heldout_data_config(train, manifest, tmp_path / "tokenizer.json", EvalConfig(corpus=["held.txt"]))
    assert (config.mask_prob, config.masking, config.max_predictions, config.corpus) == (
        0.15,
        "static",
        None,
        ["held.txt"],
    )
    assert (config.recipe, config.sentence_task, config.whole_word_masking) == ("bert", "sop", True)
    assert config.tokenizer == str(tmp_path / "tokenizer.json") and config.seed != train.seed
    # A local file list has no validation split: no held-out text unless --eval-corpus names one.
    (tmp_path / "train.txt").write_text("a b c . d e f .\n")
    files = DataConfig(corpus=[str(tmp_path / "train.txt")])
    assert heldout_data_config(files, {}, tmp_path / "tokenizer.json", EvalConfig()) is None


def test_mask_prob_sets_the_predicted_share(wikitext_dir):
    config = ExampleConfig(max_len=64, mask_prob=0.3)
    assert config.max_predictions == round(64 * 0.3)
    assert ExampleConfig(max_len=128, recipe="bert", mask_prob=0.3).max_predictions == math.ceil(128 * 0.3)
    assert ExampleConfig(max_len=128, recipe="bert").max_predictions == 20
    examples, _ = build_examples(resolve_corpus(None, str(wikitext_dir), "validation"), config)
    columns = examples.with_format("numpy")[:2000]
    expected = np.minimum(
        np.clip(np.round(columns["valid_len"] * 0.3), 1, config.max_predictions), columns["valid_len"] - 3
    )
    assert np.array_equal(columns["mlm_weights"].sum(1), expected)


def test_sentence_loss_off_leaves_mlm_only(small_set, prepared):
    _, batch, _ = small_set
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=len(prepared.vocab), sentence_loss=False))
    out = model(**batch)
    assert out.nsp_loss is None and out.nsp_correct is None and torch.equal(out.loss, out.mlm_loss)


# --- launched runs --------------------------------------------------------------------------------------------


def pretrain(launch, wikitext_dir, output_dir, *args):
    result = launch("pretrain.py", "--data-dir", str(wikitext_dir), "--output-dir", str(output_dir), *RUN_ARGS, *args)
    assert result.returncode == 0, result.log[-3000:]
    return result


@pytest.fixture(scope="module")
def eval_run(launch, wikitext_dir, tmp_path_factory):
    """4 steps, a held-out evaluation after every step, checkpoints every 2."""
    output_dir = tmp_path_factory.mktemp("eval-run")
    log = pretrain(launch, wikitext_dir, output_dir, "--eval-interval", "1", "--save-interval", "2").log
    return output_dir, log


def comparable(records):
    return [
        {
            k: v
            for k, v in r.items()
            if k not in ("eval_seconds", "train_seconds", "pairs_per_s", "tokens_per_s", "data_wait_pct")
        }
        for r in records
    ]


def test_eval_outputs(eval_run):
    output_dir, log = eval_run
    evals = read_metrics(output_dir, "validation")
    assert [m["step"] for m in evals] == [1, 2, 3, 4]
    assert all(m["examples"] == 64 and 0 <= m["mlm_accuracy"] <= 1 and m["nsp_loss"] > 0 for m in evals)
    assert [m["step"] for m in read_metrics(output_dir)] == [1, 2, 3, 4]  # training records apart
    assert log.count("eval step ") == 4 and "| validation | mlm loss " in log
    result = json.loads((output_dir / "train_config.json").read_text())["result"]
    assert comparable([result["eval"]]) == comparable([{k: v for k, v in evals[-1].items() if k != "step"}])
    assert (output_dir / "loss.png").is_file()


def test_eval_changes_nothing_and_resume_stays_exact(eval_run, launch, wikitext_dir, tmp_path):
    output_dir, _ = eval_run
    pretrain(launch, wikitext_dir, tmp_path / "end-only")  # evaluates at the end only
    assert comparable(read_metrics(tmp_path / "end-only")) == comparable(read_metrics(output_dir))
    pretrain(
        launch, wikitext_dir, tmp_path / "resumed", "--eval-interval", "1", "--save-interval", "2", "--max-steps", "2"
    )
    pretrain(
        launch, wikitext_dir, tmp_path / "resumed", "--eval-interval", "1", "--save-interval", "2", "--resume", "auto"
    )
    assert comparable(read_metrics(tmp_path / "resumed", None)) == comparable(read_metrics(output_dir, None))


def test_evaluate_cli_gives_the_same_numbers_for_run_checkpoint_and_hf_export(eval_run, wikitext_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    from bertds.export import main as export_main

    output_dir, _ = eval_run
    assert export_main(["--checkpoint", str(output_dir), "--out", str(tmp_path / "hf")]) == 0
    found = []
    for checkpoint, extra in (
        (output_dir, []),
        (output_dir / "checkpoints", []),
        (tmp_path / "hf", ["--data-dir", str(wikitext_dir)]),
    ):
        capsys.readouterr()
        assert evaluate_main(["--checkpoint", str(checkpoint), "--eval-examples", "64", "--json", *extra]) == 0
        found.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert found[0] == found[1] == found[2]
    assert_same_metrics(found[0], read_metrics(output_dir, "validation")[-1])  # training's batches: 32, not 64


def test_sentence_task_none_mask_prob_and_pre_ln_train(launch, wikitext_dir, tmp_path):
    pretrain(
        launch, wikitext_dir, tmp_path, "--sentence-task", "none", "--mask-prob", "0.3", "--pre-ln", "--max-steps", "2"
    )
    model, vocab = load_pretrained(tmp_path)
    assert model.config.pre_layernorm and not model.config.sentence_loss
    assert model.bert.encoder.final_LayerNorm is not None
    assert all(m["nsp_loss"] == 0 for m in read_metrics(tmp_path))
    assert read_metrics(tmp_path, "validation")[-1]["nsp_loss"] is None
    # No sentence loss term: the NSP head and the pooler keep their initial weights.
    torch.manual_seed(0)
    initial = BertForPreTraining(model.config).state_dict()
    trained = model.state_dict()
    assert all(torch.equal(initial[k], trained[k]) for k in trained if k.startswith(("nsp.", "bert.pooler.")))
    assert not torch.equal(initial["mlm.dense.weight"], trained["mlm.dense.weight"])
    saved = json.loads((tmp_path / "train_config.json").read_text())["train"]
    assert saved["data"]["mask_prob"] == 0.3 and saved["pre_ln"]


# --- weight decay groups --------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw-zero0": ({"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.5}}, 0),
    "adam-zero2": ({"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.5}}, 2),
    "lamb-zero1": ({"type": "Lamb", "params": {"lr": 0.1, "weight_decay": 0.5}}, 1),
    "adamw-zero3": ({"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.5}}, 3),
}


def test_parameter_groups_exclude_bias_and_layernorm_and_hold_a_tied_weight_once():
    model = BertForPreTraining(get_config("tiny", vocab_size=50))
    decay, no_decay = parameter_groups(model)
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in map(names.get, map(id, no_decay["params"])))
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in map(names.get, map(id, decay["params"])))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == num_parameters(model)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_weight_decay_shrinks_decayed_weights_only(name, process_group):
    optimizer, stage = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=50, num_layers=1))
    config, client_optimizer, _ = adapt_optimization(
        {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "optimizer": optimizer,
            "zero_optimization": {"stage": stage},
        },
        max_steps=1,
    )
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model), config=config, optimizer=client_optimizer
    )
    batch = {
        "tokens": torch.randint(5, 50, (2, 8)),
        "segments": torch.zeros(2, 8, dtype=torch.long),
        "valid_len": torch.tensor([8, 6]),
        "pred_positions": torch.tensor([[1, 2], [3, 4]]),
        "mlm_labels": torch.tensor([[7, 8], [9, 10]]),
        "mlm_weights": torch.ones(2, 2),
        "nsp_label": torch.tensor([0, 1]),
    }
    engine.backward(engine(**batch).loss * 0.0)  # zero gradients: any change is the weight decay
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for n in names:
        if n.endswith("bias") or "LayerNorm" in n:
            assert torch.equal(after[n], before[n]), n
        else:
            assert after[n].norm() < before[n].norm(), n
