"""What every rank takes part in so that rank 0 can report or save it: the devices of all ranks, the full weights."""

from __future__ import annotations

from collections.abc import Callable

import deepspeed
import torch
import torch.distributed as dist


def all_devices(device: torch.device) -> list[str]:
    """Collective: the device of every rank, in rank order."""
    devices: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(devices, str(device))
    return [str(d) for d in devices]


def write_full_weights(engine, write: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Collective: ``write`` gets the module's whole state dict on rank 0, gathered first when ZeRO-3 partitions the
    weights."""
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if dist.get_rank() == 0:
            write(engine.module.state_dict())
