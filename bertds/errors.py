"""Errors caused by the user's input (bad flags, data, configs) and the exit codes of every bertds command."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad flags, data or configs: one "error:" line on stderr
EXIT_DIVERGED = 3  # the loss became NaN/inf; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": stopped by a signal after saving a checkpoint (SLURM requeues)
EXIT_FAILED = 1  # a bug or a lost peer: the traceback is printed


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = EXIT_USER_ERROR


class TrainingDiverged(Exception):
    """The loss became NaN/inf; the message says where the last good checkpoint is and what to change."""

    exit_code = EXIT_DIVERGED


def on_launch_rank_0() -> bool:
    """Whether this process is launch rank 0 (RANK unset or 0): the one that says what is the same on every rank."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(command: Callable[[], object]) -> int:
    """Runs a command-line entry point and returns its exit code: the command's own when it returns an int, else 0.
    A UserError or TrainingDiverged becomes one ``error:`` line on stderr and its exit code; anything else
    propagates as a traceback (a bug). Such an error is the same on every rank of a launch (bertds agrees on it
    before raising), so only launch rank 0 prints it."""
    try:
        result = command()
    except (UserError, TrainingDiverged) as e:
        if on_launch_rank_0():
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return result if isinstance(result, int) else EXIT_OK
