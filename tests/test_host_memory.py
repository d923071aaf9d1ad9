"""The training process keeps freed host memory: once its steps have grown the heap, a large block freed and allocated
again reuses pages that are already there instead of faulting fresh ones in."""

import subprocess
import sys

import pytest

# Minor page faults of allocating and filling a 64 MiB tensor after three of the same size were allocated and freed
# (as a training step's activations are, step after step).
REFILL_FAULTS = """
import resource, sys, torch
from bertds.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(3)
for _ in range(3):
    torch.ones(16 * 2 ** 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 * 2 ** 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 64 * 2**20 // 4096


def refill_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", REFILL_FAULTS, mode], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        pytest.skip("not glibc: keep_freed_memory does not apply")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    assert refill_faults("default") > PAGES // 2  # glibc maps a block this large anew: every page faults again
    assert refill_faults("keep") < PAGES // 100  # kept in the heap: the tensor reuses the freed one's pages
