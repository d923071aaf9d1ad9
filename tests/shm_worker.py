"""One rank of a two-rank job under the deepspeed launcher: starts the process group as bertds does, reduces a
tensor through DeepSpeed's shared-memory all-reduce, and writes what it saw to $SHM_REPORT_DIR/rank{rank}.json.

    SHM_REPORT_DIR=/tmp/r python -m deepspeed.launcher.runner --num_gpus 2 tests/shm_worker.py
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist

from bertds.distributed import init_distributed, shm_allreduce_buffer, shutdown_distributed


def main() -> None:
    rank, world_size = init_distributed()
    dist.barrier()  # every rank is past its own set-up before this one looks
    segments = [shm_allreduce_buffer(r) for r in range(world_size)]
    maps = Path("/proc/self/maps").read_text().splitlines()
    segment_maps = [line.split(maxsplit=5)[-1] for line in maps if "deepspeed_allreduce" in line]
    total = torch.full((4,), float(rank + 1))
    ds_comm.inference_all_reduce(total)
    report = {
        "rank": rank,
        "world_size": world_size,
        "segments": [str(path) for path in segments],
        "mapped": sorted(set(segment_maps)),
        "names_left": [str(path) for path in segments if path.exists()],
        "sum": total.tolist(),
    }
    Path(os.environ["SHM_REPORT_DIR"], f"rank{rank}.json").write_text(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    main()
