"""Process-group setup that works under the deepspeed launcher, torchrun, SLURM and a plain ``python``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from bertds.errors import UserError

SHM_DIR = Path("/dev/shm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_rank() -> int:
    """This process' global rank, also before the process group exists (0 under a plain ``python``)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") or 0)


def check_master_port() -> None:
    """Before the process group starts, on rank 0: the rendezvous port it is about to listen on must be free; else
    another job holds it and torch would fail with an EADDRINUSE traceback after every rank has waited for it.
    (Under torchrun the agent already listens there and serves the ranks: nothing to check.)"""
    port = os.environ.get("MASTER_PORT")
    if dist.is_initialized() or launch_rank() != 0 or port is None or os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for TCPStore too
        try:
            s.bind(("", int(port)))
        except OSError as e:
            raise UserError(
                f"the master port {port} is in use ({e.strerror}), probably by another run; pass another "
                "--master_port to the deepspeed launcher (torchrun: --master-port), or set MASTER_PORT"
            ) from None


def init_distributed() -> tuple[int, int]:
    """Initialise the accelerator's backend (nccl on CUDA, gloo/ccl on CPU); returns (rank, world_size)."""
    launched = any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    if not launched:  # plain `python script.py`: a single process, without DeepSpeed's MPI discovery
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed()
        _unlink_shm_allreduce_buffer()
    _one_thread_share_per_rank()
    return dist.get_rank(), dist.get_world_size()


def shm_allreduce_buffer(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU backend creates for ``rank`` when every rank is on this machine."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU backend gives each rank a 69 MB segment in RAM-backed /dev/shm when all ranks are local
    (LOCAL_SIZE equals the world size) and never unlinks it, so every run left its segments behind, killed or not,
    until /dev/shm filled the machine's memory. Once each rank has mapped its peers' segments (they all have when
    the barrier passes) the names can go: the mappings stay valid and the kernel frees them when the ranks exit."""
    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    dist.barrier()
    shm_allreduce_buffer(dist.get_rank()).unlink(missing_ok=True)


def _one_thread_share_per_rank() -> None:
    """On CPU, ranks on one machine split its cores. The deepspeed launcher sets OMP_NUM_THREADS only with
    --bind_cores_to_rank (which needs numactl); without it every rank uses all cores and 2 ranks on 2 cores ran at a
    third of the speed of 1."""
    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """``wait_for_peers``: a barrier first, so that rank 0 (which serves the rendezvous store) leaves last; after an
    error the peers may never arrive there, so the rank leaves at once."""
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
