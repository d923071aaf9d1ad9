"""Run a training command so that a stop signal means the same whoever receives it:

    python -m bertds.supervise -- deepspeed --num_gpus 8 launcher/pretrain.py --resume auto ...
    python -m bertds.supervise -- torchrun --nproc_per_node 8 launcher/pretrain.py --resume auto ...

- SIGTERM, SIGINT, SIGHUP (forwarded as SIGTERM) and SIGUSR1 reaching this process go straight to every rank of the
  command (the topmost processes of its tree with RANK and LOCAL_RANK in their environment; the command itself when
  there are none), not to the launchers in between: DeepSpeed's launcher kills its ranks 30 s after a SIGTERM and
  exits 1, torchrun exits 1. The ranks finish their step, save a checkpoint and exit 75.
- The command runs in a session of its own, so Ctrl-C in a terminal or a kill of this process' group reaches this
  process only, once.
- This process exits only after the command, every rank it has seen and every other process of the command's tree
  are gone (on Linux it adopts ranks whose launcher died; what is left 30 s after the ranks ended is killed), with
  rank 0's exit status (75: stopped with a complete checkpoint; 0: finished; 2: bad input),
  or the command's status when rank 0 reported none.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bertds.fsutil import write_atomically

STATUS_ENV = "BERTDS_SUPERVISE_STATUS"  # where rank 0 writes its exit status
FORWARDED: dict[int, int] = {
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGINT: signal.SIGTERM,
    signal.SIGHUP: signal.SIGTERM,
    signal.SIGUSR1: signal.SIGUSR1,
}
POLL_SECONDS = 0.2
LEFTOVER_SECONDS = 30  # what a launcher may take to clean up after its ranks ended
PR_SET_CHILD_SUBREAPER = 36


def report_exit_status(code: int) -> None:
    """Called by rank 0 as it exits, when a supervisor runs it."""
    path = os.environ.get(STATUS_ENV)
    if not path or os.environ.get("RANK", "0") != "0":
        return
    write_atomically(path, f"{code}\n")


def _become_subreaper() -> None:
    """Orphaned descendants (ranks whose launcher died) become this process' children instead of init's."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _ranks(me: psutil.Process) -> list[psutil.Process]:
    """The topmost descendants with a rank environment (not their data-loader workers or helpers)."""
    with_rank = {}
    for p in me.children(recursive=True):
        try:
            env = p.environ()
            if "RANK" in env and "LOCAL_RANK" in env:
                with_rank[p.pid] = (p, p.ppid())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return [p for p, ppid in with_rank.values() if ppid not in with_rank]


def alive(p: psutil.Process) -> bool:
    """Running: not gone, not a zombie (ended, not yet collected by its parent)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap_adopted(me: psutil.Process, child: subprocess.Popen) -> None:
    for p in me.children():
        if p.pid != child.pid:
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _send(processes: list[psutil.Process], signum: int) -> None:
    for p in processes:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _forward(pending: list[int], sent: list[int], ranks: dict, child: subprocess.Popen) -> None:
    while pending:
        signum = FORWARDED[pending.pop(0)]
        sent.append(signum)
        targets = [p for p in ranks.values() if alive(p)]
        if not targets and child.poll() is None:  # no rank (yet): a plain script (or srun) is its own rank
            targets = [psutil.Process(child.pid)]
        _send(targets, signum)


def _leftovers(me: psutil.Process) -> list[psutil.Process]:
    """Descendants still running after the command and every rank ended (a launcher still cleaning up)."""
    return [p for p in me.children(recursive=True) if alive(p)]


def supervise(command: list[str]) -> int:
    _become_subreaper()
    pending: list[int] = []
    for signum in FORWARDED:
        signal.signal(signum, lambda s, frame: pending.append(s))
    status_dir = Path(tempfile.mkdtemp(prefix="bertds-supervise-"))
    status_file = status_dir / "rank0"
    try:
        child = subprocess.Popen(command, env={**os.environ, STATUS_ENV: str(status_file)}, start_new_session=True)
    except OSError as e:
        shutil.rmtree(status_dir, ignore_errors=True)
        print(f"error: cannot run {command[0]} ({e.strerror}); check the command after --", file=sys.stderr)
        return 2
    sent: list[int] = []
    me, ranks, ranks_ended = psutil.Process(), {}, None
    while True:
        for p in _ranks(me):
            if p.pid not in ranks:
                ranks[p.pid] = p
                for signum in sent:  # a rank that appeared after the signal
                    _send([p], signum)
        _forward(pending, sent, ranks, child)
        _reap_adopted(me, child)
        if child.poll() is not None and not any(alive(p) for p in ranks.values()):
            leftovers = _leftovers(me)
            if not leftovers:
                break
            ranks_ended = ranks_ended or time.monotonic()
            if time.monotonic() - ranks_ended > LEFTOVER_SECONDS:
                print(
                    f"bertds.supervise: killing what is left {LEFTOVER_SECONDS} s after the ranks ended: "
                    f"{', '.join(str(p.pid) for p in leftovers)}",
                    file=sys.stderr,
                    flush=True,
                )
                _send(leftovers, signal.SIGKILL)
        time.sleep(POLL_SECONDS)
    reported = status_file.read_text().strip() if status_file.is_file() else None
    shutil.rmtree(status_dir, ignore_errors=True)
    if reported is not None:
        return int(reported)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bertds.supervise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print(
            "error: no command to run; pass it after --, e.g. python -m bertds.supervise -- deepspeed "
            "launcher/pretrain.py ...",
            file=sys.stderr,
        )
        return 2
    return supervise(command)


if __name__ == "__main__":
    sys.exit(main())
