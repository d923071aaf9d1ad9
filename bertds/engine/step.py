"""One micro-step through a DeepSpeed engine (shared by training and benchmarks)."""

from __future__ import annotations

import contextlib

import torch

from bertds.model import BertForPreTrainingOutput


class GradientNorm:
    """The L2 norm of the gradients of the last optimizer step, before clipping. DeepSpeed measures it under ZeRO-1/2/3
    and in bf16/fp16 (``get_global_grad_norm``) but not under ZeRO-0 in fp32: there ``micro_step`` measures it at
    the accumulation boundary, on the device (read with ``get``, at log steps)."""

    def __init__(self, engine):
        self.engine = engine
        self.measured = engine.zero_optimization_stage() == 0 and not (
            engine.bfloat16_enabled() or engine.fp16_enabled()
        )
        self.value: torch.Tensor | None = None

    def measure(self) -> None:
        """After backward at an accumulation boundary (the gradients are final, all-reduced), before the step."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if grads:
            self.value = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)

    def get(self) -> float | None:
        value = self.value if self.measured else self.engine.get_global_grad_norm()
        return None if value is None else float(value)


def micro_step(
    engine, batch: dict[str, torch.Tensor], fused: bool = True, grad_norm: GradientNorm | None = None
) -> BertForPreTrainingOutput:
    """Forward, backward and ``engine.step()`` (which steps the optimizer only at accumulation boundaries).
    Returns the model's output; its statistics are read without synchronising with the device. ``grad_norm``:
    where DeepSpeed does not measure the gradient norm, it is measured into this before the optimizer step.

    ``fused``: the model computes the MLM loss itself in vocabulary chunks over the real prediction slots, never
    holding the (B, P, V) logits (same loss; ``fused=False`` is the plain logits path it is tested against)."""
    out = engine(**batch, return_logits=not fused)
    with _gradient_sync(engine):
        engine.backward(out.loss)
    if grad_norm is not None and grad_norm.measured and engine.is_gradient_accumulation_boundary():
        grad_norm.measure()
    engine.step()
    return out


def _gradient_sync(engine):
    """With one data-parallel rank and ZeRO-0 there is nothing to all-reduce, yet DeepSpeed still flattens every
    gradient into one buffer, all-reduces it and copies it back: skip it there."""
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        return engine.no_sync()
    return contextlib.nullcontext()
