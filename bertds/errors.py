"""Errors caused by the user's input (bad flags, data, configs) and the exit codes of every bertds command."""
from __future__ import annotations

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


def run_cli(command: Callable[[], int | None], *errors: type[Exception]) -> int:
    """Runs a command-line entry point: a UserError (or one of ``errors``, which must carry ``exit_code``) becomes
    one ``error:`` line on stderr and its exit code; anything else propagates as a traceback (a bug)."""
    handled: tuple[type[Exception], ...] = (UserError, *errors)
    try:
        return command() or EXIT_OK
    except handled as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USER_ERROR)
