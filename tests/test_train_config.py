"""Pretraining flags are validated when parsed (issue 13 §7): one UserError each, before anything starts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bertds.engine.runlock import RunLock
from bertds.errors import UserError
from tests.conftest import REPO, launcher_env, load_launcher

pretrain = load_launcher("pretrain.py")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--batch-size", "-4"], "--batch-size -4 must be at least 1"),
        (["--lr", "-1"], "--lr -1.0 must be positive"),
        (["--dropout", "1.5"], "--dropout 1.5 must be in"),
        (["--log-interval", "0"], "--log-interval 0 must be at least 1"),
        (["--max-steps", "0"], "--max-steps 0 must be at least 1"),
        (["--max-steps", "-1"], "--max-steps -1 must be at least 1"),
        (["--save-interval", "-1"], "--save-interval -1 must be at least 0"),
        (["--keep-last", "-1"], "--keep-last -1 must be at least 0"),
        (["--overwrite", "--resume", "auto"], "pass one"),
        (["--max-len", "4", "--truncate"], "--max-len 4: must be in 5..512"),
    ],
)
def test_bad_training_flags_are_one_user_error(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        pretrain.parse_args(args)


def test_defaults_are_the_d2l_recipe():
    cfg = pretrain.parse_args([])
    assert (cfg.model, cfg.max_steps, cfg.keep_last, cfg.wandb) == ("tiny", 50, 3, True)
    assert cfg.deepspeed_config.endswith("tiny_cpu.json")


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=f"in use by another run.*pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


def test_a_lock_left_by_a_dead_run_is_taken_over_and_reported_as_stale(tmp_path):
    # A run killed with -9 leaves its record in the lock file; the kernel released its flock when it died.
    dead = {"pid": 999999999, "host": "node7", "started": 0, "command": "launcher/pretrain.py --old"}
    (tmp_path / ".bertds.lock").write_text(json.dumps(dead) + "\n")
    with RunLock(tmp_path) as lock:
        assert lock.stale_message() is not None
        assert "ended without releasing it (pid 999999999 on node7" in lock.stale_message()
        assert json.loads((tmp_path / ".bertds.lock").read_text())["pid"] == os.getpid()
    with RunLock(tmp_path) as lock:  # a clean release leaves nothing stale
        assert lock.stale_message() is None


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        RunLock(path).acquire()


def test_a_bad_flag_is_said_once_by_a_two_rank_launch(launch, tmp_path):
    # Every rank parses the flags and exits 2; the error is the same on each, so only launch rank 0 prints it.
    result = launch("pretrain.py", "--max-steps", "0", "--output-dir", str(tmp_path), nproc=2, timeout=300)
    assert result.returncode == 2, result.log[-2000:]
    assert [line for line in result.log.splitlines() if "error: " in line] == [
        "error: --max-steps 0 must be at least 1; pass a value >= 1"
    ]
    assert not any(tmp_path.iterdir())


# --- --output-dir and --cache-dir: checked when parsed, before the process group (issue 13 §7) ----------------------


def unusable(tmp_path: Path, place: str) -> tuple[Path, str]:
    """A directory argument that cannot be used, and the refusal's reason."""
    if place == "a file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file", f"{tmp_path / 'file'} is a file, not a directory"
    if place == "a file in place of a parent":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "run", f"{tmp_path / 'file'} is a file, not a directory"
    # sysfs refuses new entries even to root, for whom access() says yes
    return Path("/sys/bertds-test"), "/sys is not writable ("


@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir"])
@pytest.mark.parametrize("place", ["a file", "a file in place of a parent", "sysfs"])
def test_an_unusable_output_or_cache_dir_is_refused_when_parsed(tmp_path, flag, place):
    path, reason = unusable(tmp_path, place)
    with pytest.raises(UserError) as refused:
        pretrain.parse_args([flag, str(path)])
    assert str(refused.value).startswith(f"{flag} {path}: {reason}") and "pass a" in str(refused.value)


PROCESS_GROUP_STARTS = "process group starts"
# Runs launcher/pretrain.py (argv[1:]) with the process group's start replaced by a line and exit 99.
STOP_AT_PROCESS_GROUP = f"""
import os, runpy, sys
import deepspeed, torch.distributed
def starts(*args, **kwargs):
    print({PROCESS_GROUP_STARTS!r}, flush=True)
    os._exit(99)
deepspeed.init_distributed = torch.distributed.init_process_group = starts
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def read_only_dir(tmp_path):
    """(directory, command prefix under which it is read-only): for root, whom permission bits do not stop, a
    read-only bind mount in a private mount namespace (a read-only file system); for others, mode 0555."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path, []
        path.chmod(0o755)
        return
    prefix = ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(path)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without a private mount namespace: no read-only directory to test with")
    yield path, prefix


@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir", None])
def test_a_read_only_output_or_cache_dir_exits_2_before_the_process_group_starts(
    read_only_dir, flag, tmp_path, wikitext_dir, cache_dir
):
    read_only, prefix = read_only_dir
    dirs = {"--output-dir": str(tmp_path / "run"), "--cache-dir": str(cache_dir)}
    if flag is not None:
        dirs[flag] = str(read_only / "sub")
    command = [
        sys.executable,
        "-c",
        STOP_AT_PROCESS_GROUP,
        str(REPO / "launcher" / "pretrain.py"),
        "--data-dir",
        str(wikitext_dir),
        *(x for item in dirs.items() for x in item),
    ]
    result = subprocess.run(
        [*prefix, *command], cwd=REPO, env=launcher_env(cache_dir), capture_output=True, text=True, timeout=300
    )
    if flag is None:  # the probe sees the process group start when nothing is wrong
        assert result.returncode == 99 and PROCESS_GROUP_STARTS in result.stdout, result.stdout + result.stderr
        return
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {flag} {read_only / 'sub'}: {read_only} is not writable ("
    )
    assert PROCESS_GROUP_STARTS not in result.stdout and "Traceback" not in result.stderr
