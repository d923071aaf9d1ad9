"""Pretraining flags are validated when parsed (issue 13 §7): one UserError each, before anything starts."""
import os

import pytest

from bertds.engine.runlock import RunLock
from bertds.errors import UserError
from tests.conftest import load_launcher

pretrain = load_launcher("pretrain.py")


@pytest.mark.parametrize("args, message", [
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
])
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
        "error: --max-steps 0 must be at least 1; pass a value >= 1"]
    assert not any(tmp_path.iterdir())
