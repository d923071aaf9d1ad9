"""DeepSpeed JSON configs: reading them with clear errors, and the batch-size arithmetic."""

from __future__ import annotations

import difflib
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
        raise UserError(
            f"DeepSpeed config {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file"
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object; fix the file")
    validate_ds_config(config, path)
    return config


def with_lr(ds_config: dict, lr: float | None) -> dict:
    """``ds_config`` with its optimizer's lr set to ``lr`` (a ``--lr`` flag; None keeps the JSON's; no optimizer
    section: DeepSpeed's Adam)."""
    if lr is not None:
        ds_config.setdefault("optimizer", {"type": "Adam", "params": {}}).setdefault("params", {})["lr"] = lr
    return ds_config


# Top-level sections and keys DeepSpeed reads (runtime/config.py and the feature configs it delegates to).
DEEPSPEED_KEYS = frozenset(
    """
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print dump_state
    optimizer scheduler fp16 bf16 bfloat16 amp torch_autocast data_types communication_data_type
    seq_parallel_communication_data_type gradient_clipping prescale_gradients gradient_predivide_factor
    gradient_allreduce_op sparse_gradients zero_optimization zero_allow_untested_optimizer
    zero_force_ds_cpu_optimizer activation_checkpointing wall_clock_breakdown memory_breakdown flops_profiler
    tensorboard wandb csv_monitor comet comms_logger autotuning elasticity pipeline data_efficiency
    curriculum_learning compression_training checkpoint aio nebula eigenvalue progressive_layer_drop
    sparse_attention disable_allgather dataloader_drop_last load_universal_checkpoint use_node_local_storage
    hybrid_engine compile timers weight_quantization tensor_parallel expert_parallel
    use_data_before_expert_parallelism disable_python_gc log_level lower_precision_safe_modules
    managed_gradient_accumulation legacy_fusion graph_harvesting vocabulary_size
""".split()
)


def validate_ds_config(config: dict, path: str | Path) -> None:
    """Unknown top-level keys (DeepSpeed would silently ignore a misspelt one) and invalid ZeRO sections are
    UserErrors naming the key."""
    for key in config:
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "remove it"
            raise UserError(f"DeepSpeed config {path} has an unknown key '{key}'; {hint}")
    _check_type(config, "optimizer", path, _optimizer_names())
    _check_type(config, "scheduler", path, _scheduler_names())
    if "zero_optimization" in config:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError

        try:
            DeepSpeedZeroConfig(**config["zero_optimization"])
        except (ValidationError, TypeError) as e:
            first = e.errors()[0] if isinstance(e, ValidationError) else {"loc": (), "msg": str(e)}
            where = ".".join(str(part) for part in first["loc"])
            raise UserError(
                f"DeepSpeed config {path}: zero_optimization.{where}: {first['msg']}; fix the file"
            ) from None


def _optimizer_names() -> dict[str, str]:
    """Lower-case name -> spelling of what ``"optimizer": {"type": ...}`` accepts: DeepSpeed's own optimizers (any
    case) and, as DeepSpeed falls back to them, torch.optim's classes."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    names = {
        n.lower(): n
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n != "Optimizer"
    }
    return {**names, **{n: names.get(n, n) for n in DEEPSPEED_OPTIMIZERS}}


def _scheduler_names() -> dict[str, str]:
    """As ``_optimizer_names`` for ``"scheduler"``: DeepSpeed's schedules, torch's, and bertds' PolyWarmup."""
    import torch
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    schedules = torch.optim.lr_scheduler
    names = [
        n
        for n in dir(schedules)
        if isinstance(getattr(schedules, n), type)
        and issubclass(getattr(schedules, n), schedules.LRScheduler)  # not the module's helpers (Counter, ...)
        and n not in ("LRScheduler", "_LRScheduler")
    ]
    return {n.lower(): n for n in [*VALID_LR_SCHEDULES, *names, "PolyWarmup"]}


def _check_type(config: dict, section: str, path: str | Path, known: dict[str, str]) -> None:
    """A misspelt optimizer or scheduler type is a UserError with a did-you-mean (DeepSpeed raises deep inside
    initialize, after the process group and the data are up)."""
    kind = (config.get(section) or {}).get("type")
    if kind is None:
        return
    case_insensitive = section == "optimizer"
    if (kind.lower() if case_insensitive else kind) in (known if case_insensitive else known.values()):
        return
    close = difflib.get_close_matches(kind.lower(), list(known), n=1, cutoff=0.6)
    hint = f"did you mean '{known[close[0]]}'?" if close else f"choose one of {', '.join(sorted(known.values()))}"
    raise UserError(f"DeepSpeed config {path}: unknown {section} type '{kind}'; {hint}")


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
    if total is None:
        if micro is None:
            raise UserError(
                "the DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu; "
                "set one of them or pass --batch-size"
            )
        total = micro * (accum or 1) * world_size
    elif micro is None:
        accum = accum or 1
        if total % (accum * world_size):
            raise UserError(
                f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} "
                f"× world size {world_size}; choose a batch size that is a multiple of "
                f"{accum * world_size}"
            )
        micro = total // (accum * world_size)
    elif accum is None:
        if total % (micro * world_size):
            raise UserError(
                f"train_batch_size {total} is not divisible by micro batch {micro} × world size "
                f"{world_size}; choose a batch size that is a multiple of {micro * world_size}"
            )
        accum = total // (micro * world_size)
    accum = accum or 1
    if micro * accum * world_size != total:
        raise UserError(
            f"train_batch_size {total} != micro batch {micro} × gradient accumulation {accum} × "
            f"world size {world_size} = {micro * accum * world_size}; fix the DeepSpeed config"
        )
    config.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return config
