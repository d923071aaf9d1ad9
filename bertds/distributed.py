"""Process-group setup that works under the deepspeed launcher, torchrun, SLURM and a plain ``python``."""
from __future__ import annotations

import os
import socket

import deepspeed
import torch.distributed as dist


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
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
