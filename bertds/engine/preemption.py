"""Graceful stop: on SIGTERM / SIGUSR1 (what SLURM, Kubernetes and ``bertds.supervise`` send) or when the launcher
that started this rank is gone, the ranks finish the step, save a checkpoint and exit 75.

A rank must never outlive its peers because of this: the handlers are installed only once the process group is
complete (before that a signal ends the rank as usual), and a rank that does not reach the end of its step within
``stop_timeout`` seconds of a signal (blocked in a collective whose peers are gone) exits without a checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

import psutil
import torch
import torch.distributed as dist

from bertds.supervise import STATUS_ENV, alive

DEEPSPEED_LAUNCH = "deepspeed.launcher.launch"


def launcher_processes() -> list[psutil.Process]:
    """The processes whose end means nobody will stop or collect this rank: its parent (the deepspeed launcher's
    per-node process, torchrun's agent, srun's step daemon) and, under DeepSpeed, the ``deepspeed`` command above
    that process (which, killed, leaves the per-node process running)."""
    try:
        parent = psutil.Process(os.getppid())
        watched = [parent]
        if any(DEEPSPEED_LAUNCH in part for part in parent.cmdline()) and parent.ppid() > 1:
            watched.append(psutil.Process(parent.ppid()))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    return [p for p in watched if p.pid > 1]


def _warn_launcher_gone(pid: int) -> None:
    if os.environ.get("LOCAL_RANK", "0") != "0":  # once per machine
        return
    hint = (
        ""
        if os.environ.get(STATUS_ENV)
        else (
            "; nothing waits for this checkpoint (a signalled deepspeed command ends at once): start runs as "
            "`python -m bertds.supervise -- deepspeed ...` (or torchrun), which exits 75 once every rank has saved"
        )
    )
    print(
        f"warning: the launcher process {pid} is gone: saving a checkpoint and stopping{hint}",
        file=sys.stderr,
        flush=True,
    )


class PreemptionWatcher:
    """Records a stop signal; ``should_stop`` agrees across ranks (a signal may reach only some of them, a launcher
    may die on one node only), over a gloo group so that the check never synchronises with the accelerator."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stop_timeout: float = 120.0):
        self._group = dist.new_group(backend="gloo")  # a collective: before the handlers (see the module docstring)
        self.received: int | None = None
        self.reason: str | None = None
        self._launchers = launcher_processes()
        self._stop_timeout = stop_timeout
        self._stepping_ended = threading.Event()
        # The C-level handler writes each signal to this socket even while the main thread is blocked in a
        # collective, where the Python handler cannot run: the watchdog thread sees it at once.
        self._wakeup_read, wakeup_write = socket.socketpair()
        self._wakeup_write = wakeup_write
        wakeup_write.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        threading.Thread(target=self._watchdog, name="bertds-stop-watchdog", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.reason = f"signal {signal.Signals(signum).name}"

    def _watchdog(self) -> None:
        while True:
            try:
                data = self._wakeup_read.recv(64)
            except OSError:
                return
            if not data:  # closed
                return
            stops = [s for s in data if s in self.SIGNALS]
            if not stops or self._stepping_ended.is_set():
                continue
            if self._stepping_ended.wait(self._stop_timeout):
                return
            print(
                f"error: {signal.Signals(stops[0]).name} received but this rank's step did not end within "
                f"--stop-timeout {self._stop_timeout:g} s (a peer rank is gone or stuck); exiting without a "
                "checkpoint, resume from the last one",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + stops[0])

    def _launcher_gone(self) -> bool:
        for process in self._launchers:
            if not alive(process):  # a zombie too: killed, not yet collected by its parent
                if self.reason is None:
                    self.reason = f"the launcher process {process.pid} is gone"
                    _warn_launcher_gone(process.pid)
                return True
        return False

    def should_stop(self) -> bool:
        """Collective: every rank calls it at the end of each step."""
        local = self.received is not None or self._launcher_gone()
        flag = torch.tensor([1 if local else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        stop = bool(flag.item())
        if stop:
            self.reason = self.reason or "another rank was stopped"
            self._stepping_ended.set()
        return stop

    def disarm(self) -> None:
        """The steps are over (the final save may take long): the watchdog stands down; signals are still recorded."""
        self._stepping_ended.set()

    def close(self) -> None:
        self._stepping_ended.set()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        self._wakeup_write.close()
        self._wakeup_read.shutdown(socket.SHUT_RDWR)  # wakes the watchdog's recv
        self._wakeup_read.close()
