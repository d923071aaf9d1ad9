"""The training process keeps freed host memory: a large block freed and allocated again is not faulted in anew."""
import subprocess
import sys

import pytest

# Minor page faults of allocating and filling a 256 MiB tensor a second time, after the first one was freed.
REFILL_FAULTS = """
import resource, sys, torch
from bertds.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(3)
torch.ones(64 * 2 ** 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 * 2 ** 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def refill_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", REFILL_FAULTS, mode], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        pytest.skip("not glibc: keep_freed_memory does not apply")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    pages = 256 * 2 ** 20 // 4096
    assert refill_faults("default") > pages // 2  # glibc maps a block this large anew: every page faults again
    assert refill_faults("keep") < pages // 100  # kept in the heap: the second tensor reuses the first one's pages
