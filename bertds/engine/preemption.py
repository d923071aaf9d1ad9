"""Graceful stop on SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before killing a job)."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the SLURM template requeues on it


class PreemptionWatcher:
    """Records a stop signal; ``should_stop`` agrees across ranks (a signal may reach only some of them), over a
    gloo group so that the check never synchronises with the accelerator's stream."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._group = dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if self.received else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
