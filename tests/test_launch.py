"""The launch tree under faults (issue 13 §1, §2, §5), with real processes: 2 CPU ranks, the tiny model, few steps.

A stop signal to any process of the tree (``bertds.supervise``, DeepSpeed's per-node launch process, every process
group, a supervised torchrun) saves a complete checkpoint and exits 75 only after every rank is gone; a rank whose
launcher was killed saves and stops; an exception on one rank ends all of them; a full disk while saving is one
error line. All launches share the session's prepared dataset (tests/conftest.py)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bertds.engine.checkpoint import LATEST, verify
from bertds.engine.tracking import read_metrics
from bertds.errors import EXIT_FAILED, EXIT_PREEMPTED, EXIT_USER_ERROR
from bertds.supervise import alive as running
from tests.conftest import DIST_ENV, REPO, free_port, launcher_env, torchrun_command

TRAIN = ["--batch-size", "32", "--log-interval", "1", "--max-steps", "40", "--no-wandb", "--eval-examples", "64"]
STOP_WITHIN = 120  # seconds a stopped or failed run may take to end: far below the 40 steps it would otherwise run


def deepspeed_command(script: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        script,
        *args,
    ]


def supervised(command: list[str]) -> list[str]:
    return [sys.executable, "-m", "bertds.supervise", "--", *command]


def pretrain_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*TRAIN, "--data-dir", str(data_dir), "--output-dir", str(output_dir), *extra]


def start(command: list[str], cache_dir: Path, log: Path) -> subprocess.Popen:
    """In a session of its own (as a shell would start it), output to ``log`` (a pipe could fill and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=launcher_env(cache_dir), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = STOP_WITHIN) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the command did not end within {timeout} s:\n{log.read_text()[-3000:]}")
    return log.read_text()


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["step"] >= step for m in read_metrics(output_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no step {step} within {timeout} s:\n{log.read_text()[-3000:]}")


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The command and all its descendants, now."""
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def ranks(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for p in processes:
        try:
            if "LOCAL_RANK" in p.environ():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def deepspeed_launch(processes: list[psutil.Process]) -> psutil.Process:
    return next(p for p in processes if "deepspeed.launcher.launch" in " ".join(p.cmdline()))


def alive(processes: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} {p.name()}" for p in processes if running(p)]


def stopped_checkpoint(output_dir: Path) -> tuple[int, str | None]:
    """(the step ``latest`` names, what keeps that checkpoint from verifying)."""
    checkpoints = output_dir / "checkpoints"
    tag = (checkpoints / LATEST).read_text().strip()
    return int(tag.removeprefix("step")), verify(checkpoints / tag)


def signal_tree(target: str, proc: subprocess.Popen) -> None:
    processes = tree(proc)
    if target in ("supervisor", "supervised torchrun"):
        proc.send_signal(signal.SIGTERM)
    elif target == "deepspeed launch process":
        deepspeed_launch(processes).send_signal(signal.SIGTERM)
    elif target == "every process group":  # the supervisor's and the one the command runs in (its own session)
        for group in {os.getpgid(p.pid) for p in processes}:
            os.killpg(group, signal.SIGTERM)


# Each case resumes the checkpoint the case before it stopped with (the torchrun one resumes a deepspeed
# checkpoint), so that every stop is shown to resume with one launch per case.
TARGETS = ("supervisor", "deepspeed launch process", "every process group", "supervised torchrun")


def test_sigterm_to_any_process_of_the_launch_tree_saves_exits_75_and_resumes(wikitext_dir, cache_dir, tmp_path):
    output_dir, resumed_from = tmp_path / "run", None
    for target in TARGETS:
        log = tmp_path / f"{target.replace(' ', '-')}.log"
        launcher = torchrun_command if "torchrun" in target else deepspeed_command
        args = pretrain_args(wikitext_dir, output_dir, *(["--resume", "auto"] if resumed_from else []))
        proc = start(supervised(launcher("launcher/pretrain.py", *args)), cache_dir, log)
        wait_for_step(output_dir, (resumed_from or 0) + 1, proc, log)
        processes = tree(proc)
        assert len(ranks(processes)) == 2, processes
        signal_tree(target, proc)
        output = finish(proc, log)
        step, damage = stopped_checkpoint(output_dir)  # first, before anything could still be writing it
        left = alive(processes)
        assert proc.returncode == EXIT_PREEMPTED, f"{target}: exit {proc.returncode}\n{output[-3000:]}"
        assert damage is None and step > (resumed_from or 0), f"{target}: step {step}: {damage}\n{output[-3000:]}"
        assert not left, f"{target}: processes outlived the command: {left}"
        assert f"stopped (signal SIGTERM) after step {step}; resume with --resume auto" in output, output[-3000:]
        if resumed_from:
            assert f"resumed from {output_dir / 'checkpoints' / f'step{resumed_from:08d}'}" in output, output[-3000:]
        resumed_from = step
    log = tmp_path / "resume.log"
    proc = start(
        torchrun_command(
            "launcher/pretrain.py",
            *pretrain_args(wikitext_dir, output_dir, "--resume", "auto", "--max-steps", str(resumed_from + 1)),
        ),
        cache_dir,
        log,
    )
    output = finish(proc, log, timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert f"resumed from {output_dir / 'checkpoints' / f'step{resumed_from:08d}'}" in output, output[-3000:]


def wait_until_gone(processes: list[psutil.Process], timeout: float = STOP_WITHIN) -> list[str]:
    """The processes still alive after ``timeout`` (they may be nobody's children: zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(processes)


def test_ranks_whose_launcher_was_killed_save_and_stop(wikitext_dir, cache_dir, tmp_path):
    output_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(deepspeed_command("launcher/pretrain.py", *pretrain_args(wikitext_dir, output_dir)), cache_dir, log)
    wait_for_step(output_dir, 1, proc, log)
    processes = tree(proc)
    launch, rank_processes = deepspeed_launch(processes), ranks(processes)
    launch.send_signal(signal.SIGKILL)
    left = wait_until_gone(rank_processes)
    output = finish(proc, log)
    assert not left, f"ranks trained on after their launcher was killed: {left}\n{output[-3000:]}"
    step, damage = stopped_checkpoint(output_dir)
    assert damage is None and 0 < step < 40, f"step {step}: {damage}\n{output[-3000:]}"
    assert f"stopped (the launcher process {launch.pid} is gone) after step {step}" in output, output[-3000:]


def test_an_exception_on_one_rank_ends_every_rank_with_the_traceback(wikitext_dir, cache_dir, tmp_path):
    output_dir, log = tmp_path / "run", tmp_path / "run.log"
    command = deepspeed_command("tests/fail_on_rank.py", "1", "3", *pretrain_args(wikitext_dir, output_dir))
    proc = start(command, cache_dir, log)
    wait_for_step(output_dir, 1, proc, log)
    rank_processes = ranks(tree(proc))
    output = finish(proc, log, timeout=60)
    assert proc.returncode == EXIT_FAILED, output[-3000:]
    assert "Traceback" in output and "RuntimeError: injected failure on rank 1 in micro-step 3" in output, output[
        -3000:
    ]
    assert not alive(rank_processes)


@pytest.fixture
def small_disk(tmp_path):
    """A 128 MB tmpfs (a checkpoint of the tiny model is 36 MB); skipped where this user may not mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); run as root")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_full_disk_while_saving_is_one_error_and_keeps_the_previous_checkpoint(launch, wikitext_dir, small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(68 << 20))  # leaves room for one checkpoint, not two
    output_dir, checkpoints = small_disk / "run", small_disk / "run" / "checkpoints"
    args = [*TRAIN, "--data-dir", str(wikitext_dir), "--output-dir", str(output_dir), "--save-interval", "2"]
    full = launch("pretrain.py", *args)
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert full.returncode == EXIT_USER_ERROR and len(errors) == 1, full.log[-3000:]
    assert "no space left on device" in errors[0] and str(checkpoints / "step00000004") in errors[0], errors
    assert "it needs about 36" in errors[0] and "MB" in errors[0], errors  # the size of the previous checkpoint
    assert "Traceback" not in full.log
    assert not (checkpoints / "step00000004").exists()  # the partial checkpoint is removed
    assert (checkpoints / LATEST).read_text().strip() == "step00000002"
    ballast.unlink()
    resumed = launch("pretrain.py", *args, "--resume", "auto", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert f"resumed from {checkpoints / 'step00000002'}" in resumed.log
    assert verify(checkpoints / "step00000004") is None


SBATCH = REPO / "launcher" / "slurm" / "pretrain_bert_large.sbatch"
# Stands in for srun: srun passes the signals it receives to every task.
STOPPABLE = (
    "import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); print('ready', "
    "flush=True); time.sleep(60)"
)


def test_the_slurm_template_signals_every_rank_and_requeues_on_75():
    text = SBATCH.read_text()
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    assert re.search(r"^#SBATCH --signal=USR1@\d+$", text, re.M)  # to every task (rank); B: would reach bash only
    assert "#SBATCH --requeue" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "python -m bertds.supervise -- srun --kill-on-bad-exit=1" in text
    assert "exec python launcher/pretrain.py" in text and "--resume auto" in text
    assert '[ "$rc" -ne 2 ] && [ "$rc" -ne 3 ]' in text  # bad input and divergence are not requeued


def test_the_slurm_batch_shell_passes_a_signal_on_and_returns_the_status_of_the_ranks(tmp_path):
    """The template's own lines from the background start to the wait loop, on a stand-in for srun's tasks."""
    text = SBATCH.read_text()
    waiting = text[text.index("supervisor=$!") : text.index("done\n", text.index("supervisor=$!")) + 5]
    script = f'python -m bertds.supervise -- {sys.executable} -c "{STOPPABLE}" &\n{waiting}exit "$rc"\n'
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    shell = subprocess.Popen(
        ["bash", "-c", script],
        cwd=REPO,
        env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert shell.stdout.readline() == "ready\n"
    shell.send_signal(signal.SIGUSR1)
    assert shell.wait(timeout=60) == EXIT_PREEMPTED
