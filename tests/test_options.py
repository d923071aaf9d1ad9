import argparse
from dataclasses import dataclass

import pytest

from bertds.errors import EXIT_USER_ERROR, UserError, run_cli
from bertds.options import add_options, from_args, option


@dataclass
class Example:
    steps: int = option(50, "optimizer steps")
    lr: float | None = option(None, "peak learning rate")
    corpus: list[str] | None = option(None, "corpus names")
    fast: bool = option(False, "go fast")
    wandb: bool = option(True, "log to wandb")
    recipe: str = option("d2l", "example recipe", choices=["d2l", "bert"])
    port: int = option(29500, "master port", flag="--master-port-number")
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
    cfg = parse(["--steps", "7", "--lr", "0.5", "--corpus", "a", "b", "--fast", "--no-wandb", "--recipe", "bert",
                 "--master-port-number", "1"])
    assert (cfg.steps, cfg.lr, cfg.corpus, cfg.fast, cfg.wandb, cfg.recipe, cfg.port) == \
        (7, 0.5, ["a", "b"], True, False, "bert", 1)
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
