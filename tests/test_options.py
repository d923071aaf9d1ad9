import argparse
import re
from dataclasses import dataclass

import pytest

from bertds.errors import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, TrainingDiverged, UserError, run_cli
from bertds.options import add_options, from_args, option, redefault


@dataclass
class Example:
    steps: int = option(50, "optimizer steps")
    lr: float | None = option(None, "peak learning rate")
    corpus: list[str] | None = option(None, "corpus names")
    fast: bool = option(False, "go fast")
    wandb: bool = option(True, "log to wandb")
    recipe: str = option("d2l", "example recipe", choices=["d2l", "bert"])
    port: int = option(29500, "master port", flag="--master-port-number")
    keep: int = option(3, "checkpoints to keep", group="checkpoints")
    resume: str | None = option(None, "checkpoint to resume", group="checkpoints")
    internal: str = "not a flag"

    def __post_init__(self):
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    return from_args(Example, parser.parse_args(argv))


def test_defaults_come_from_the_dataclass():
    assert parse([]) == Example()


def test_flags_are_typed_and_named_after_the_fields():
    cfg = parse(
        [
            "--steps",
            "7",
            "--lr",
            "0.5",
            "--corpus",
            "a",
            "b",
            "--fast",
            "--no-wandb",
            "--recipe",
            "bert",
            "--master-port-number",
            "1",
        ]
    )
    assert (cfg.steps, cfg.lr, cfg.corpus, cfg.fast, cfg.wandb, cfg.recipe, cfg.port) == (
        7,
        0.5,
        ["a", "b"],
        True,
        False,
        "bert",
        1,
    )
    assert cfg.internal == "not a flag"


def test_choices_are_enforced_by_argparse():
    with pytest.raises(SystemExit):
        parse(["--recipe", "gpt"])


def test_validation_runs_when_the_flags_are_parsed():
    with pytest.raises(UserError, match="--steps must be at least 1"):
        parse(["--steps", "0"])


def test_run_cli_turns_a_user_error_into_one_line_and_exit_2(capsys):
    def command():
        raise UserError("--steps must be at least 1; pass a positive number")

    assert run_cli(command) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: --steps must be at least 1; pass a positive number\n"


def test_run_cli_lets_bugs_through():
    def command():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_cli(command)


def test_grouped_options_get_their_own_help_section():
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    main_section, checkpoints = parser.format_help().split("\noptions:\n")[1].split("\ncheckpoints:\n")
    assert "--steps" in main_section and "--keep" not in main_section and "--resume" not in main_section
    assert checkpoints.split() == [
        "--keep",
        "KEEP",
        "checkpoints",
        "to",
        "keep",
        "--resume",
        "RESUME",
        "checkpoint",
        "to",
        "resume",
    ]
    assert parse(["--keep", "5", "--resume", "auto"]) == Example(keep=5, resume="auto")


@dataclass
class Faster(Example):
    steps: int = redefault(Example, "steps", 10)


def test_a_subclass_changes_a_default_and_keeps_the_help():
    parser = argparse.ArgumentParser()
    add_options(parser, Faster)
    assert parser.parse_args([]).steps == 10 and re.search(r"--steps STEPS\s+optimizer steps", parser.format_help())
    with pytest.raises(UserError, match="--steps must be at least 1"):  # the inherited validation runs
        Faster(steps=0)


def test_run_cli_exit_codes(capsys):
    def diverged():
        raise TrainingDiverged("the loss became NaN/inf at step 6")

    assert run_cli(diverged) == EXIT_DIVERGED
    assert capsys.readouterr().err == "error: the loss became NaN/inf at step 6\n"
    assert run_cli(lambda: EXIT_PREEMPTED) == EXIT_PREEMPTED
    assert run_cli(lambda: {"a result": 1}) == run_cli(lambda: None) == EXIT_OK


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_run_cli_prints_a_job_wide_error_once_on_launch_rank_0(rank, printed, capsys, monkeypatch):
    monkeypatch.setenv("RANK", rank)

    def command():
        raise UserError("--max-len 600 exceeds the model's 512 positions; lower --max-len")

    assert run_cli(command) == EXIT_USER_ERROR  # every rank exits 2
    assert capsys.readouterr().err == (
        "error: --max-len 600 exceeds the model's 512 positions; lower --max-len\n" if printed else ""
    )
