"""One micro-step through a DeepSpeed engine (shared by training and benchmarks)."""
from __future__ import annotations

import contextlib

import torch

from bertds.model import BertForPreTrainingOutput


def micro_step(engine, batch: dict[str, torch.Tensor], fused: bool = True) -> BertForPreTrainingOutput:
    """Forward, backward and ``engine.step()`` (which steps the optimizer only at accumulation boundaries).
    Returns the model's output; its statistics are read without synchronising with the device.

    ``fused``: the model computes the MLM loss itself in vocabulary chunks over the real prediction slots, never
    holding the (B, P, V) logits (same loss; ``fused=False`` is the plain logits path it is tested against)."""
    out = engine(**batch, return_logits=not fused)
    with _gradient_sync(engine):
        engine.backward(out.loss)
    engine.step()
    return out


def _gradient_sync(engine):
    """With one data-parallel rank and ZeRO-0 there is nothing to all-reduce, yet DeepSpeed still flattens every
    gradient into one buffer, all-reduces it and copies it back: skip it there."""
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        return engine.no_sync()
    return contextlib.nullcontext()
