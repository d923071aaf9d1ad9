"""PreemptionWatcher's stop watchdog: a rank signalled while blocked (its peers gone) exits within --stop-timeout."""

import signal
import subprocess
import sys

from tests.conftest import REPO, free_port

# A one-rank gloo group, a watcher with a 1 s stop timeout, a SIGTERM to itself, then a step that never ends.
STUCK_RANK = """
import os, signal, sys, time
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
from bertds.engine.preemption import PreemptionWatcher
watcher = PreemptionWatcher(stop_timeout=1.0)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(60)
print("still running", flush=True)
"""


def test_a_signal_during_a_step_that_never_ends_exits_after_the_stop_timeout():
    result = subprocess.run(
        [sys.executable, "-c", STUCK_RANK.format(port=free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,  # far below the 60 s the step would block: only the watchdog can end it in time
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "still running" not in result.stdout
    assert "error: SIGTERM received but this rank's step did not end within --stop-timeout 1 s" in result.stderr
