"""DeepSpeed JSON configs: reading them with clear errors, and the batch-size arithmetic."""
from __future__ import annotations

import json
from pathlib import Path

from bertds.errors import UserError


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; pass --deepspeed_config ds_configs/<name>.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        "fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object; fix the file")
    return config


def resolve_batch_sizes(ds_config: dict, world_size: int, batch_size: int | None = None) -> dict:
    """Fills train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps so that
    global = micro × accumulation × world size, or raises a UserError naming the numbers."""
    config = dict(ds_config)
    if batch_size is not None:
        config["train_batch_size"] = batch_size
        config.pop("train_micro_batch_size_per_gpu", None)
    total = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    if total is None and micro is None:
        raise UserError("the DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu; "
                        "set one of them or pass --batch-size")
    if total is None:
        total = micro * (accum or 1) * world_size
    elif micro is None:
        accum = accum or 1
        if total % (accum * world_size):
            raise UserError(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} "
                            f"× world size {world_size}; choose a batch size that is a multiple of "
                            f"{accum * world_size}")
        micro = total // (accum * world_size)
    elif accum is None:
        if total % (micro * world_size):
            raise UserError(f"train_batch_size {total} is not divisible by micro batch {micro} × world size "
                            f"{world_size}; choose a batch size that is a multiple of {micro * world_size}")
        accum = total // (micro * world_size)
    accum = accum or 1
    if micro * accum * world_size != total:
        raise UserError(f"train_batch_size {total} != micro batch {micro} × gradient accumulation {accum} × "
                        f"world size {world_size} = {micro * accum * world_size}; fix the DeepSpeed config")
    config.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return config
