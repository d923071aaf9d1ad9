"""Checkpoint integrity (issue 13): manifests verified before resuming, fallback to the newest complete checkpoint,
weights-only loading, --max-len checked on resume, damaged weights as one error line."""

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from bertds import safe_load
from bertds.engine.checkpoint import LATEST, find_checkpoint, rank_file
from bertds.engine.tracking import read_metrics
from bertds.errors import UserError
from bertds.pretrained import WEIGHTS_CHECKSUM_FILE, WEIGHTS_FILE, load_pretrained

RUN = ("--max-steps", "4", "--save-interval", "2", "--batch-size", "32", "--log-interval", "2", "--no-wandb")


@pytest.fixture(scope="module")
def finished_run(launch, wikitext_dir, tmp_path_factory) -> Path:
    """A one-rank run with checkpoints at steps 2 and 4 (and its model.pt)."""
    output_dir = tmp_path_factory.mktemp("checkpointed-run")
    result = launch(
        "pretrain.py", "--data-dir", str(wikitext_dir), "--output-dir", str(output_dir), *RUN, "--overwrite"
    )
    assert result.returncode == 0, result.log[-3000:]
    return output_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns(".bertds.lock"))
    return copy


def checkpoints(run: Path) -> Path:
    return run / "checkpoints"


def test_an_intact_run_resumes_from_latest(run_copy):
    assert (checkpoints(run_copy) / LATEST).read_text().strip() == "step00000004"
    assert find_checkpoint(run_copy, "auto", max_len=64) == checkpoints(run_copy) / "step00000004"


@pytest.mark.parametrize("damage", ["missing rank file", "truncated model states", "latest garbage", "latest deleted"])
def test_a_damaged_latest_falls_back_to_the_newest_complete_checkpoint(run_copy, damage, capsys):
    newest = checkpoints(run_copy) / "step00000004"
    if damage == "missing rank file":
        (newest / rank_file(0)).unlink()
    elif damage == "truncated model states":
        states = newest / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    elif damage == "latest garbage":
        (checkpoints(run_copy) / LATEST).write_bytes(b"\xff\xfe\x00garbage")
    else:
        shutil.rmtree(newest)
    # garbage in latest: the newest checkpoint is intact, so it is the one; otherwise the one before it
    expected = "step00000004" if damage == "latest garbage" else "step00000002"
    assert find_checkpoint(run_copy, "auto", max_len=64) == checkpoints(run_copy) / expected
    warning = capsys.readouterr().err
    assert f"resuming from {checkpoints(run_copy) / expected}" in warning and "verifies" in warning


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file_and_the_complete_ones(run_copy):
    newest = checkpoints(run_copy) / "step00000004"
    (newest / rank_file(0)).unlink()
    with pytest.raises(UserError) as refused:
        find_checkpoint(run_copy, str(newest), max_len=64)
    assert rank_file(0) in str(refused.value) and "step00000002" in str(refused.value)


def test_no_complete_checkpoint_is_one_error(run_copy):
    for tag in ("step00000002", "step00000004"):
        (checkpoints(run_copy) / tag / rank_file(0)).unlink()
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoint(run_copy, "auto", max_len=64)


def test_resuming_with_another_max_len_is_refused(run_copy):
    with pytest.raises(UserError, match="max.len"):
        find_checkpoint(run_copy, "auto", max_len=32)


def test_resume_with_a_missing_rank_file_exits_2_with_one_error_line(launch, wikitext_dir, run_copy):
    newest = checkpoints(run_copy) / "step00000004"
    (newest / rank_file(0)).unlink()
    result = launch(
        "pretrain.py", "--data-dir", str(wikitext_dir), "--output-dir", str(run_copy), *RUN, "--resume", str(newest)
    )
    assert result.returncode == 2, result.log[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and rank_file(0) in errors[0]
    assert "Traceback" not in result.log
    assert (checkpoints(run_copy) / "step00000002").is_dir()  # nothing destroyed


class RunsCode:
    """A pickle payload: unpickling it calls Path.touch on the marker (any callable would run the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_pickle_is_refused_without_running_its_code(tmp_path):
    marker, crafted = tmp_path / "code-ran", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": RunsCode(marker)}, crafted)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        safe_load.load(crafted)
    assert not marker.exists()
    safe_load.load(crafted, trust=True)  # what --trust-checkpoint does: the user accepted that it runs code
    assert marker.exists()


def test_a_truncated_model_pt_is_one_error_naming_it(run_copy):
    weights = run_copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=WEIGHTS_FILE):
        load_pretrained(run_copy)


def test_a_flipped_byte_in_model_pt_is_caught_by_its_checksum(run_copy):
    # torch does not check its zip's checksums: without model.pt.sha256 this file would load with a wrong weight.
    weights = run_copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{WEIGHTS_FILE} does not match its SHA-256 in {WEIGHTS_CHECKSUM_FILE}"):
        load_pretrained(run_copy)


def test_export_of_a_crafted_checkpoint_exits_2_and_runs_nothing(run_copy, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    marker = tmp_path / "code-ran"
    checkpoint = checkpoints(run_copy) / "step00000004"
    torch.save(
        {"module": {}, "payload": RunsCode(marker)},
        checkpoint / "mp_rank_00_model_states.pt",
        pickle_protocol=pickle.DEFAULT_PROTOCOL,
    )
    result = subprocess.run(
        [sys.executable, "-m", "bertds.export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("error:") == 1 and not marker.exists()


def test_overwrite_leaves_nothing_of_the_old_run(run_copy, launch, wikitext_dir):
    # The old run saved steps 2 and 4; a 3-step replacement must not leave step00000004 (or its metrics) beside its own.
    result = launch(
        "pretrain.py", "--data-dir", str(wikitext_dir), "--output-dir", str(run_copy), "--overwrite",
        "--max-steps", "3", "--save-interval", "3", "--batch-size", "32", "--log-interval", "1", "--no-wandb",
    )  # fmt: skip
    assert result.returncode == 0, result.log[-3000:]
    assert sorted(p.name for p in checkpoints(run_copy).iterdir()) == [LATEST, "step00000003"]
    assert (checkpoints(run_copy) / LATEST).read_text().strip() == "step00000003"
    assert [record["step"] for record in read_metrics(run_copy)] == [1, 2, 3]


@pytest.fixture(scope="module")
def two_rank_run(launch, wikitext_dir, tmp_path_factory) -> Path:
    """A two-rank run with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("two-rank-run")
    result = launch("pretrain.py", "--data-dir", str(wikitext_dir), "--output-dir", str(output_dir), *RUN, nproc=2)
    assert result.returncode == 0, result.log[-3000:]
    return output_dir


@pytest.mark.parametrize("resume", ["the damaged checkpoint", "auto"])
def test_a_missing_rank_file_under_two_ranks_is_one_error_or_a_fallback_never_a_hang(
    two_rank_run, tmp_path, launch, wikitext_dir, resume
):
    # Issue 13 §1: rank 1's file of the newest checkpoint deleted; every rank must learn it before any collective.
    run = tmp_path / "run"
    shutil.copytree(two_rank_run, run, ignore=shutil.ignore_patterns(".bertds.lock"))
    damaged = checkpoints(run) / "step00000004"
    (damaged / rank_file(1)).unlink()
    flag = str(damaged) if resume != "auto" else "auto"
    result = launch(
        "pretrain.py", "--data-dir", str(wikitext_dir), "--output-dir", str(run), *RUN[2:], "--max-steps", "6",
        "--resume", flag, nproc=2, timeout=300,
    )  # fmt: skip
    errors = [line for line in result.log.splitlines() if line.startswith("error:")]
    if resume == "auto":  # falls back to the newest checkpoint that verifies, and says so
        assert result.returncode == 0, result.log[-3000:]
        assert not errors and "resuming from" in result.log and "step00000002" in result.log
        assert (checkpoints(run) / LATEST).read_text().strip() == "step00000006"
        return
    assert result.returncode == 2, result.log[-3000:]
    assert len(errors) == 1, result.log[-3000:]
    assert rank_file(1) in errors[0] and "step00000002" in errors[0]  # names the missing file and what verifies
    assert "Traceback" not in result.log
    assert (damaged / rank_file(0)).is_file()  # nothing deleted
