"""Scaling the same code: ZeRO stages, precision, gradient accumulation, every shipped DeepSpeed config, multi-node
launch, two-phase pretraining."""

import json
import math
import re
import subprocess
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.accelerator import get_accelerator

from bertds.data import DataConfig
from bertds.engine import load_ds_config, micro_step
from bertds.engine import train as train_module
from bertds.engine.optim import Lamb, adapt_optimization, poly_warmup_factor
from bertds.engine.tracking import read_metrics
from bertds.model import BertForPreTraining, get_config
from tests.conftest import REPO, free_port, launcher_env

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
PRETRAIN_CONFIGS = [c for c in CONFIGS if not c.name.startswith("finetune")]
TRAJECTORY = ["--max-steps", "5", "--batch-size", "64", "--log-interval", "1", "--no-wandb"]
LOSS_TOLERANCE = 1e-4  # fp32 on CPU: stages differ only in reduction order


def write_config(directory: Path, name: str, **changes) -> Path:
    config = {**json.loads((REPO / "ds_configs" / "tiny_cpu.json").read_text()), **changes}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def trajectory(output_dir: Path) -> list[tuple[float, float]]:
    return [(m["mlm_loss"], m["nsp_loss"]) for m in read_metrics(output_dir)]


def assert_same_trajectory(a, b, tolerance=LOSS_TOLERANCE):
    assert len(a) == len(b) == 5
    assert all(abs(x - y) <= tolerance for pa, pb in zip(a, b) for x, y in zip(pa, pb)), (a, b)


def tiny_batch(examples, rows) -> dict:
    device = get_accelerator().current_device_name()
    return {k: v.to(device) for k, v in examples.with_format("torch")[rows].items()}


def tiny_engine(vocab, config: dict, optimizer=None, scheduler=None, dropout=0.0):
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=len(vocab), dropout=dropout, attention_dropout=dropout))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, optimizer=optimizer, lr_scheduler=scheduler
    )
    return engine


# --- 2 ranks: every ZeRO stage follows the same loss trajectory ------------------------------------------------


@pytest.fixture(scope="module")
def zero_runs(launch, wikitext_dir, tmp_path_factory):
    runs = {}
    for stage in (0, 1, 2, 3):
        directory = tmp_path_factory.mktemp(f"zero{stage}")
        config = write_config(directory, f"zero{stage}", zero_optimization={"stage": stage})
        # ZeRO-3 also recomputes every encoder block in backward (activation checkpointing).
        extra = ["--activation-checkpointing"] if stage == 3 else []
        result = launch(
            "pretrain.py",
            *TRAJECTORY,
            "--deepspeed_config",
            str(config),
            "--data-dir",
            str(wikitext_dir),
            "--output-dir",
            str(directory / "run"),
            *extra,
            nproc=2,
        )
        assert result.returncode == 0, result.log[-3000:]
        runs[stage] = directory / "run"
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_give_the_same_losses_as_plain_data_parallel(zero_runs, stage):
    assert_same_trajectory(trajectory(zero_runs[stage]), trajectory(zero_runs[0]))
    assert json.loads((zero_runs[stage] / "train_config.json").read_text())["deepspeed"]["zero_optimization"] == {
        "stage": stage
    }


def test_zero3_final_weights_are_gathered_for_the_saved_model(zero_runs):
    from bertds.pretrained import load_pretrained

    model, _ = load_pretrained(zero_runs[3])  # a partitioned (empty) parameter would fail to load
    stage0, _ = load_pretrained(zero_runs[0])
    for (name, a), b in zip(model.state_dict().items(), stage0.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_simulated_two_nodes_match_one_node_with_two_ranks(zero_runs, wikitext_dir, cache_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    config = write_config(tmp_path, "zero0", zero_optimization={"stage": 0})
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        cmd = [
            "python",
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            str(REPO / "launcher" / "pretrain.py"),
            *TRAJECTORY,
            "--deepspeed_config",
            str(config),
            "--data-dir",
            str(wikitext_dir),
            "--output-dir",
            str(tmp_path / "run"),
        ]
        nodes.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=launcher_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "world size 2" in outputs[0]
    assert_same_trajectory(trajectory(tmp_path / "run"), trajectory(zero_runs[0]))  # threads per rank differ


# --- in-process engines ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def equal_length_examples(prepared):
    """Examples with the same number of prediction positions, so that averages over micro-batches combine exactly."""
    counts = prepared.examples.with_format("numpy")["valid_len"]
    length = int(torch.tensor(counts).mode().values)
    return prepared.examples.filter(lambda b: [n == length for n in b["valid_len"]], batched=True).select(range(16))


def test_gradient_accumulation_2x4_equals_micro_batch_8(process_group, prepared, equal_length_examples):
    # Plain SGD: unlike Adam, its update is proportional to the gradient, so a mis-scaled accumulation shows.
    results = []
    for micro, accumulation in ((8, 1), (4, 2)):
        engine = tiny_engine(
            prepared.vocab,
            {
                "train_batch_size": 8,
                "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": accumulation,
            },
            optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        )
        losses = []
        for step in range(2):
            for k in range(accumulation):
                start = step * 8 + k * micro
                stats = micro_step(engine, tiny_batch(equal_length_examples, range(start, start + micro)))
                losses.append(stats.loss.detach())
        step_losses = torch.stack(losses).view(2, accumulation).mean(1)
        results.append((step_losses, [p.detach().clone() for p in engine.module.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        results[0][1][0],
        tiny_engine(prepared.vocab, {"train_batch_size": 8}).module.bert.embeddings.word_embeddings.weight.detach(),
    )  # the steps did move the weights


def test_bf16_zero2_trains(process_group, prepared):
    engine = tiny_engine(
        prepared.vocab,
        {
            "train_batch_size": 16,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        },
    )
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    batch = tiny_batch(prepared.examples, range(16))
    losses = [float(micro_step(engine, batch).mlm_loss) for _ in range(6)]
    assert all(map(math.isfinite, losses)) and min(losses[1:]) < losses[0] - 1.0, losses  # fits the batch


def test_fp16_dynamic_loss_scaling_skips_overflow_steps(process_group, prepared, monkeypatch):
    # CPUs here cannot run fp16 through DeepSpeed; its loss scaler is exercised with the documented patch.
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    engine = tiny_engine(
        prepared.vocab,
        {
            "train_batch_size": 8,
            "zero_optimization": {"stage": 2},
            "fp16": {"enabled": True, "initial_scale_power": 32, "loss_scale_window": 1000, "hysteresis": 1},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        },
    )
    batch = tiny_batch(prepared.examples, range(8))
    overflows = 0
    for _ in range(31):  # 2^32 x loss overflows fp16 gradients; each overflow halves the scale until one fits
        scale, skipped = engine.optimizer.loss_scale, engine.skipped_steps
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        micro_step(engine, batch)
        after = [p.detach().float() for p in engine.module.parameters()]
        if engine.skipped_steps == skipped + 1:  # skipped: the weights stay, the scale halves
            overflows += 1
            assert engine.optimizer.loss_scale == scale / 2
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            continue
        assert engine.skipped_steps == skipped  # applied: the weights move, the scale stays (window of 1000 steps)
        assert engine.optimizer.loss_scale == scale
        assert not all(torch.equal(a, b) for a, b in zip(before, after))
        break
    else:
        pytest.fail("every step overflowed")
    assert overflows >= 1 and engine.skipped_steps == overflows and engine.global_steps == overflows + 1
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_training_loop_counts_and_logs_fp16_skipped_steps(
    process_group, wikitext_dir, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    config = write_config(
        tmp_path,
        "fp16",
        zero_optimization={"stage": 2},
        fp16={"enabled": True, "initial_scale_power": 32, "hysteresis": 1},
    )
    cfg = train_module.TrainConfig(
        deepspeed_config=str(config),
        data=DataConfig(data_dir=str(wikitext_dir), cache_dir=str(cache_dir)),
        batch_size=8,
        max_steps=6,
        log_interval=1,
        output_dir=str(tmp_path / "run"),
        wandb=False,
    )
    train_module.train(cfg)  # overflowing steps are not divergence
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["skipped_steps"] >= 1 and metrics[0]["loss_scale"] <= 2**31
    assert metrics[-1]["loss_scale"] < metrics[0]["loss_scale"]


def test_lamb_fallback_matches_the_lamb_update_rule():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, requires_grad=True)
    reference = weight.detach().clone()
    optimizer = Lamb([weight], lr=0.1, weight_decay=0.01)
    m = v = torch.zeros_like(reference)
    for step in (1, 2):
        grad = torch.randn(4, 3)
        weight.grad = grad.clone()
        optimizer.step()
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        update = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8) + 0.01 * reference
        trust = (reference.norm() / update.norm()).clamp(0.01, 10.0)
        reference = reference - 0.1 * trust * update
        torch.testing.assert_close(weight.detach(), reference)


def test_poly_warmup_schedule_follows_nvidia_recipe():
    assert [poly_warmup_factor(s, 10, 100) for s in (0, 5, 10)] == [0.0, 0.5, 0.9**0.5]
    assert poly_warmup_factor(100, 10, 100) == 0.0 and poly_warmup_factor(150, 10, 100) == 0.0


# --- every shipped config -------------------------------------------------------------------------------------


def readme_config_table() -> dict[str, dict]:
    """Rows of the README's config table: | `name.json` | purpose | GPUs | micro | accumulation | ... |"""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        match = re.match(r"\|\s*`(\w+\.json)`\s*\|[^|]*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", line)
        if match:
            rows[match.group(1)] = {
                "gpus": int(match.group(2)),
                "micro": int(match.group(3)),
                "accumulation": int(match.group(4)),
            }
    return rows


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=[c.name for c in PRETRAIN_CONFIGS])
def test_config_is_documented_with_consistent_batch_arithmetic(path):
    config, row = load_ds_config(path), readme_config_table().get(path.name)
    assert row is not None, f"{path.name} is missing from the README's config table"
    micro = config.get("train_micro_batch_size_per_gpu", config["train_batch_size"] // row["gpus"])
    assert micro == row["micro"]
    assert config["train_batch_size"] == row["micro"] * row["accumulation"] * row["gpus"]


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=[c.name for c in PRETRAIN_CONFIGS])
def test_config_starts_an_engine_on_cpu_with_the_tiny_model(path, process_group, prepared):
    config, row = load_ds_config(path), readme_config_table()[path.name]
    # The tiny model, a micro batch of 2 on this one rank, the documented accumulation; fp16 -> bf16 (no CPU fp16).
    config.update(
        train_batch_size=2 * row["accumulation"],
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=row["accumulation"],
    )
    if config.pop("fp16", {}).get("enabled"):
        config["bf16"] = {"enabled": True}
    engine_config, optimizer, scheduler = adapt_optimization(config, max_steps=10)
    engine = tiny_engine(prepared.vocab, engine_config, optimizer, scheduler, dropout=0.1)
    for k in range(row["accumulation"]):
        stats = micro_step(engine, tiny_batch(prepared.examples, range(2 * k, 2 * k + 2)))
        assert torch.isfinite(stats.mlm_loss) and torch.isfinite(stats.nsp_loss)
    assert engine.global_steps == 1
    assert engine.zero_optimization_stage() == config["zero_optimization"]["stage"]


# --- two-phase pretraining ------------------------------------------------------------------------------------


def test_two_phase_script_continues_phase1_weights_at_512_tokens(wikitext_dir, cache_dir, tmp_path):
    tiny = str(REPO / "ds_configs" / "tiny_cpu.json")
    env = launcher_env(
        cache_dir,
        LAUNCH=f"python -m deepspeed.launcher.runner --num_gpus 1 --master_port {free_port()}",
        MODEL="tiny",
        PHASE1_CONFIG=tiny,
        PHASE1_STEPS="4",
        PHASE2_CONFIG=tiny,
        PHASE2_STEPS="2",
    )
    result = subprocess.run(
        [
            "bash",
            str(REPO / "launcher" / "pretrain_two_phase.sh"),
            str(tmp_path),
            "--data-dir",
            str(wikitext_dir),
            "--batch-size",
            "16",
            "--log-interval",
            "1",
            "--no-wandb",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    phase1, phase2 = read_metrics(tmp_path / "phase1"), read_metrics(tmp_path / "phase2")
    assert [m["step"] for m in phase1] == [1, 2, 3, 4] and [m["step"] for m in phase2] == [1, 2]
    assert phase2[0]["mlm_loss"] < phase1[0]["mlm_loss"] - 1.0  # started from phase 1's weights
    settings = json.loads((tmp_path / "phase2" / "train_config.json").read_text())["train"]
    assert settings["data"]["max_len"] == 512 and settings["init_from"] == str(tmp_path / "phase1")
    caches = {json.loads(p.read_text())["max_len"] for p in Path(cache_dir).glob("*/manifest.json")}
    assert {128, 512} <= caches
