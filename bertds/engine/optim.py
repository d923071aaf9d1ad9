"""Optimizer and schedule choices the DeepSpeed JSON names, with fallbacks where the accelerator lacks a kernel.

- ``"Lamb"``: DeepSpeed's FusedLamb on CUDA; where it cannot build (CPU), the same algorithm in plain PyTorch.
- ``"Adam"/"AdamW"`` on CPU: ``torch_adam`` (DeepSpeed's fused CPU kernel needs a JIT build first; same math).
- ``"scheduler": {"type": "PolyWarmup"}``: NVIDIA's BERT schedule (linear warmup, then polynomial decay), which
  DeepSpeed does not ship; ``WarmupDecayLR`` without ``total_num_steps`` gets ``--max-steps``, and ``WarmupLR`` /
  ``WarmupDecayLR`` without ``warmup_max_lr`` peak at the optimizer's lr (``--lr``), not DeepSpeed's 0.001.
- Weight decay: ``parameter_groups`` puts biases and LayerNorm weights in a group without decay (Google's and
  NVIDIA's BERT), for whatever optimizer the JSON names.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from bertds.errors import UserError


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) with DeepSpeed FusedLamb's semantics: Adam direction plus decoupled weight decay,
    scaled per tensor by the trust ratio ||w|| / ||update|| clamped to [min_coeff, max_coeff]."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                grad = p.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m, v = exp_avg, exp_avg_sq
                if group["bias_correction"]:
                    m = m / (1 - beta1 ** state["step"])
                    v = v / (1 - beta2 ** state["step"])
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * p.float()
                weight_norm, update_norm = p.float().norm(), update.norm()
                trust = torch.where(
                    (weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, torch.ones_like(weight_norm)
                ).clamp(group["min_coeff"], group["max_coeff"])
                p.add_((update * trust * -group["lr"]).to(p.dtype))
        return loss


def parameter_groups(model: nn.Module) -> list[dict]:
    """Parameters for ``deepspeed.initialize``: a group with the optimizer's weight decay and one with
    ``weight_decay`` 0 holding every bias and LayerNorm weight (as Google's BERT excludes "bias" and "LayerNorm";
    like nanoGPT's ``configure_optimizers``). A tied weight appears once. Empty groups are left out."""
    no_decay_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.LayerNorm)
        for p in module.parameters(recurse=False)
    }
    no_decay_ids |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    params = [p for p in model.parameters() if p.requires_grad]  # named_parameters/parameters yield a tied one once
    decay = [p for p in params if id(p) not in no_decay_ids]
    no_decay = [p for p in params if id(p) in no_decay_ids]
    groups: list[dict] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def poly_warmup_factor(step: int, warmup_num_steps: int, total_num_steps: int, power: float = 0.5) -> float:
    """Multiplier of the peak lr: linear warmup to 1, then (1 - step / total) ** power, as NVIDIA's BERT recipe."""
    if step < warmup_num_steps:
        return step / max(1, warmup_num_steps)
    return max(0.0, 1.0 - step / max(1, total_num_steps)) ** power


def _fused_lamb_available() -> bool:
    builder = get_accelerator().create_op_builder("FusedLambBuilder")
    return builder is not None and get_accelerator().device_name() != "cpu" and builder.is_compatible(verbose=False)


def adapt_optimization(ds_config: dict, max_steps: int):
    """Returns (ds_config for deepspeed.initialize, client optimizer factory or None, client scheduler factory or
    None). Each factory is what ``deepspeed.initialize`` accepts as a callable."""
    config = copy.deepcopy(ds_config)
    optimizer_factory = scheduler_factory = None
    optimizer = config.get("optimizer")
    on_cpu = get_accelerator().device_name() == "cpu"
    if optimizer is not None:
        kind = optimizer.get("type", "").lower()
        if kind == "lamb" and not _fused_lamb_available():
            lamb_params = dict(optimizer.get("params", {}))
            lamb_params.pop("max_grad_norm", None)  # clipping is DeepSpeed's gradient_clipping
            config.pop("optimizer")
            config["zero_allow_untested_optimizer"] = True  # ZeRO wraps any torch optimizer; this one is tested
            optimizer_factory = functools.partial(Lamb, **lamb_params)
        elif kind in ("adam", "adamw") and on_cpu:
            optimizer.setdefault("params", {}).setdefault("torch_adam", True)
    scheduler = config.get("scheduler")
    if scheduler is not None:
        schedule = scheduler.setdefault("params", {})
        if scheduler.get("type") == "PolyWarmup":
            config.pop("scheduler")
            warmup = schedule.get("warmup_num_steps", 0)
            total = schedule.get("total_num_steps", max_steps)
            power = schedule.get("power", 0.5)
            scheduler_factory = functools.partial(
                LambdaLR, lr_lambda=lambda step: poly_warmup_factor(step, warmup, total, power)
            )
        elif scheduler.get("type") == "WarmupDecayLR":
            schedule.setdefault("total_num_steps", max_steps)
        if scheduler.get("type") in ("WarmupLR", "WarmupDecayLR") and optimizer is not None:
            lr = optimizer.get("params", {}).get("lr")
            if lr is not None:
                schedule.setdefault("warmup_max_lr", lr)
    if config.get("fp16", {}).get("enabled") and not get_accelerator().is_fp16_supported():
        raise UserError(
            f"fp16 is not supported on this {get_accelerator().device_name()} accelerator; "
            "use a bf16 or fp32 DeepSpeed config (e.g. ds_configs/tiny_cpu.json)"
        )
    return config, optimizer_factory, scheduler_factory
