"""Faults a long pretraining run meets: kill -9, preemption signals, crashes while saving, divergence, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertds.data import DataConfig
from bertds.engine import train as train_module
from bertds.engine.tracking import read_metrics
from bertds.errors import EXIT_PREEMPTED as PREEMPTED_EXIT_CODE
from tests.conftest import REPO, launcher_command, launcher_env

STEPS = 20
RUN = ["--batch-size", "32", "--log-interval", "1", "--max-steps", str(STEPS)]


def start(cache_dir, output_dir, *args, nproc=None, env=None) -> subprocess.Popen:
    cmd = launcher_command("pretrain.py", *RUN, "--output-dir", str(output_dir), *args, nproc=nproc)
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=launcher_env(cache_dir, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["step"] >= step for m in read_metrics(output_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no step {step} within {timeout} s")


def losses(metrics):
    return {m["step"]: (m["mlm_loss"], m["nsp_loss"]) for m in metrics}


def latest(output_dir: Path) -> str:
    return (output_dir / "checkpoints" / "latest").read_text()


@pytest.fixture(scope="module")
def reference(launch, wikitext_dir, tmp_path_factory):
    """Uninterrupted 20-step runs (1 and 2 ranks); the 1-rank run also logs to wandb (offline)."""
    runs = {}
    for nproc in (None, 2):
        output_dir = tmp_path_factory.mktemp(f"reference-{nproc}")
        extra = [] if nproc is None else ["--no-wandb"]
        result = launch(
            "pretrain.py",
            *RUN,
            "--data-dir",
            str(wikitext_dir),
            "--output-dir",
            str(output_dir),
            "--save-interval",
            "10",
            *extra,
            nproc=nproc,
        )
        assert result.returncode == 0, result.log[-3000:]
        runs[nproc] = output_dir
    return runs


@pytest.mark.parametrize("nproc", [None, 2], ids=["1-rank", "2-ranks"])
def test_kill_9_and_resume_reproduces_the_uninterrupted_losses(
    reference, launch, wikitext_dir, cache_dir, tmp_path, nproc
):
    args = ["--data-dir", str(wikitext_dir), "--save-interval", "10", "--no-wandb"]
    proc = start(cache_dir, tmp_path, *args, nproc=nproc)
    wait_for_step(tmp_path, 12, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-step
    proc.wait()
    assert latest(tmp_path) == "step00000010"
    result = launch("pretrain.py", *RUN, "--output-dir", str(tmp_path), *args, "--resume", "auto", nproc=nproc)
    assert result.returncode == 0, result.log[-3000:]
    assert "resumed from" in result.log and "step00000010" in result.log
    resumed, expected = losses(read_metrics(tmp_path)), losses(read_metrics(reference[nproc]))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert all(resumed[s] == expected[s] for s in range(11, STEPS + 1)), (resumed, expected)  # bit-identical


def test_sigterm_saves_a_checkpoint_and_exits_75_then_resumes(reference, launch, wikitext_dir, cache_dir, tmp_path):
    args = ["--data-dir", str(wikitext_dir), "--no-wandb"]
    proc = start(cache_dir, tmp_path, *args)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    stopped_at = max(m["step"] for m in read_metrics(tmp_path))
    assert latest(tmp_path) == f"step{stopped_at:08d}" and stopped_at < STEPS
    assert "resume with --resume auto" in output
    result = launch("pretrain.py", *RUN, "--output-dir", str(tmp_path), *args, "--resume", "auto")
    assert result.returncode == 0, result.log[-3000:]
    resumed, expected = losses(read_metrics(tmp_path)), losses(read_metrics(reference[None]))
    assert resumed == expected


def test_a_crash_while_saving_never_becomes_latest(reference, launch, wikitext_dir, cache_dir, tmp_path):
    args = [*RUN, "--data-dir", str(wikitext_dir), "--output-dir", str(tmp_path), "--save-interval", "5", "--no-wandb"]
    crashed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "crash_before_latest.py"), "step00000010", *args],
        cwd=REPO,
        env=launcher_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert crashed.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "step00000010").is_dir()  # written, but never committed
    assert latest(tmp_path) == "step00000005"
    result = launch("pretrain.py", *args, "--resume", "auto")
    assert result.returncode == 0 and "step00000005" in result.log, result.log[-3000:]
    assert losses(read_metrics(tmp_path)) == losses(read_metrics(reference[None]))


def test_tracking_outputs(reference):
    run = reference[None]
    metrics, saved = read_metrics(run), json.loads((run / "train_config.json").read_text())
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    max_len = saved["train"]["data"]["max_len"]
    for m in metrics:
        assert m["lr"] == saved["deepspeed"]["optimizer"]["params"]["lr"]  # tiny_cpu.json: a constant lr
        assert m["loss_scale"] is None and m["skipped_steps"] == 0  # fp32: no loss scaler
        assert 0 <= m["mlm_accuracy"] < 1 and 0 < m["grad_norm"] < math.inf and 0 <= m["data_wait_pct"] < 100
        # Both rates divide by the step's seconds: their ratio is the mean length of the step's sentence pairs.
        assert 5 <= m["tokens_per_s"] / m["pairs_per_s"] <= max_len
    assert metrics[-1]["mlm_loss"] < metrics[0]["mlm_loss"] and metrics[-1]["mlm_accuracy"] > 0
    result = saved["result"]  # one micro-batch per logged step: the run's losses are the means of the logged ones
    assert result["steps"] == STEPS
    assert result["mlm_loss"] == pytest.approx(sum(m["mlm_loss"] for m in metrics) / STEPS, rel=1e-6)
    assert result["nsp_loss"] == pytest.approx(sum(m["nsp_loss"] for m in metrics) / STEPS, rel=1e-6)
    heldout = read_metrics(run, "validation")  # evaluated once, at the end
    assert [m["step"] for m in heldout] == [STEPS]
    assert {k: v for k, v in heldout[0].items() if k not in ("step", "train_seconds")} == result["eval"]
    assert math.isfinite(result["eval"]["mlm_loss"]) and result["eval"]["examples"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wandb_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    logged = wandb_files[0].read_bytes()
    assert all(
        k.encode() in logged for k in ("mlm_loss", "nsp_loss", "mlm_accuracy", "tokens_per_s", "lr", "eval/mlm_loss")
    )
    assert b"train_batch_size" in logged  # the run config


def snapshot(directory: Path) -> dict:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def bad_configs(tmp_path):
    configs = {
        "unknown_key": {"train_batch_sizes": 32},
        "bad_zero": {"train_batch_size": 32, "zero_optimization": {"stage": 2, "overlap_com": True}},
        "indivisible": {"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8},
        "accumulation": {"train_batch_size": 96, "gradient_accumulation_steps": 7},
    }
    for name, config in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    (tmp_path / "empty_data").mkdir()
    corpus = tmp_path / "other_corpus"
    corpus.mkdir()
    (corpus / "wiki.train.tokens").write_text(" alpha beta . gamma delta . epsilon zeta \n" * 50)
    return tmp_path


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "holds another run (train_config.json, metrics.jsonl, checkpoints, model.pt); pass --resume auto"),
        (
            ["--resume", "auto", "--deepspeed_config", "{cfg}/unknown_key.json"],
            "has an unknown key 'train_batch_sizes'; did you mean 'train_batch_size'?",
        ),
        (
            ["--resume", "auto", "--deepspeed_config", "{cfg}/bad_zero.json"],
            "zero_optimization.overlap_com: Extra inputs are not permitted",
        ),
        (
            ["--resume", "auto", "--deepspeed_config", "{cfg}/accumulation.json", "--batch-size", "96"],
            "train_batch_size 96 is not divisible by gradient_accumulation_steps 7 × world size 1",
        ),
        (
            ["--resume", "auto", "--batch-size", "64"],
            "was written with train_batch_size 32 (now 64), micro_batch 32 (now 64); resume with the same",
        ),
        (
            ["--resume", "auto", "--deepspeed_config", "{cfg}/indivisible.json"],
            "train_batch_size 100 is not divisible by micro batch 8 × world size 1",
        ),
        (["--resume", "auto", "--data-dir", "{cfg}/empty_data"], "wiki.train.tokens is missing"),
        (["--resume", "auto", "--model", "small"], "was written for another model config (hidden_size: checkpoint 128"),
        (["--resume", "auto", "--data-dir", "{cfg}/other_corpus"], "was written with a different vocabulary"),
        (["--resume", "auto", "--max-len", "600"], "--max-len 600 exceeds the model's 512 positions"),
        (["--resume", "auto", "--model", "huge"], "unknown model 'huge'"),
        (["--resume", "/nonexistent/checkpoint"], "--resume /nonexistent/checkpoint is not a bertds checkpoint"),
    ],
    ids=[
        "other-run",
        "unknown-key",
        "bad-zero",
        "batch-flag",
        "resume-batch",
        "batch-json",
        "empty-data",
        "model-config",
        "vocabulary",
        "max-len",
        "model-name",
        "resume-path",
    ],
)
def test_bad_input_exits_2_and_leaves_the_run_untouched(reference, launch, wikitext_dir, bad_configs, args, message):
    run = reference[None]
    before = snapshot(run)
    args = [a.replace("{cfg}", str(bad_configs)) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(wikitext_dir)]
    # No --batch-size here unless the case sets one: it would override the JSON under test.
    result = launch("pretrain.py", "--max-steps", str(STEPS), "--output-dir", str(run), "--no-wandb", *args)
    assert result.returncode == 2, result.log[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert snapshot(run) == before


def test_resuming_a_finished_run_changes_nothing(reference, launch, wikitext_dir):
    run = reference[None]
    before = snapshot(run)
    result = launch("pretrain.py", *RUN, "--output-dir", str(run), "--data-dir", str(wikitext_dir), "--resume", "auto")
    assert result.returncode == 0 and "nothing to do" in result.log, result.log[-2000:]
    assert snapshot(run) == before


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    process_group, tiny_ds_config, wikitext_dir, cache_dir, tmp_path, monkeypatch
):
    real_step, calls = train_module.micro_step, []

    def poisoned_step(engine, batch, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # weights turn NaN during step 6, as after an exploding update
            with torch.no_grad():
                next(engine.module.parameters()).fill_(float("nan"))
        return real_step(engine, batch, **kwargs)

    monkeypatch.setattr(train_module, "micro_step", poisoned_step)
    cfg = train_module.TrainConfig(
        deepspeed_config=str(tiny_ds_config),
        data=DataConfig(data_dir=str(wikitext_dir), cache_dir=str(cache_dir)),
        batch_size=16,
        max_steps=10,
        log_interval=1,
        save_interval=2,
        output_dir=str(tmp_path),
        wandb=False,
    )
    with pytest.raises(train_module.TrainingDiverged, match="loss became NaN/inf at step 6"):
        train_module.train(cfg)
    assert latest(tmp_path) == "step00000004"
    assert not (tmp_path / "checkpoints" / "step00000006").exists()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
