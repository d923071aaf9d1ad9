"""Process-group setup that works under the deepspeed launcher, torchrun, SLURM and a plain ``python``."""
from __future__ import annotations

import os
import socket

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise the accelerator's backend (nccl on CUDA, gloo/ccl on CPU); returns (rank, world_size)."""
    launched = any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    if not launched:  # plain `python script.py`: a single process, without DeepSpeed's MPI discovery
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed()
    _one_thread_share_per_rank()
    return dist.get_rank(), dist.get_world_size()


def _one_thread_share_per_rank() -> None:
    """On CPU, ranks on one machine split its cores. The deepspeed launcher sets OMP_NUM_THREADS only with
    --bind_cores_to_rank (which needs numactl); without it every rank uses all cores and 2 ranks on 2 cores ran at a
    third of the speed of 1."""
    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
