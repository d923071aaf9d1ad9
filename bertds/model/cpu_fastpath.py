"""Eager-CPU fast paths of the model, each computing what its general counterpart computes: dropout with masks
drawn by numpy on two threads (torch's CPU bernoulli_ is slow) and attention written out where SDPA would fall back to
its math path with that slow mask. torch.compile and accelerators never take them (they generate or have their own
kernels).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def eager_cpu(x: torch.Tensor) -> bool:
    """True where the CPU fast paths apply: eager CPU tensors (torch.compile generates its own kernels)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class Dropout(nn.Dropout):
    """nn.Dropout, the same distribution (keep with probability 1 - p, scale by 1 / (1 - p)), with the CPU mask from
    ``cpu_dropout_mask`` in eager CPU training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or not eager_cpu(x):
            return super().forward(x)
        return cpu_dropout(x, self.p)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """x times a mask of 0 and 1 / (1 - p): one multiplication forward and one backward (the mask is a constant)."""
    return x.mul(cpu_dropout_mask(x.shape, p).to(x.dtype))


def cpu_dropout_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """float32 ``shape``: 1 / (1 - p) with probability 1 - p, else 0. Kept where 32-bit uniform integers from numpy's
    PCG64 (both halves of its 64-bit outputs) are >= p·2³². Large masks are drawn in two halves on two threads (numpy
    releases the GIL), each from its own seed; the seeds come from torch's generator, so torch.manual_seed fixes the
    masks."""
    n = math.prod(shape)
    mask = np.empty(n, dtype=np.float32)
    seeds = torch.randint(2**62, (2,)).tolist()
    if n < PARALLEL_MASK_MIN:
        _draw_scaled_keep(seeds[0], p, mask)
    else:
        helper = threading.Thread(target=_draw_scaled_keep, args=(seeds[1], p, mask[n // 2 :]))
        helper.start()
        _draw_scaled_keep(seeds[0], p, mask[: n // 2])
        helper.join()
    return torch.from_numpy(mask).view(shape)


PARALLEL_MASK_MIN = 1 << 16  # elements from which a mask is drawn on two threads


def _draw_scaled_keep(seed: int, p: float, out: np.ndarray) -> None:
    bits = np.random.PCG64(seed).random_raw((len(out) + 1) // 2).view(np.uint32)[: len(out)]
    np.multiply(bits >= np.uint32(round(p * 2**32)), np.float32(1 / (1 - p)), out=out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d), masked) v on (batch, heads, seq_len, head_dim). SDPA (flash / memory-efficient
    kernels) everywhere, except eager CPU training with attention dropout: SDPA then takes its math path with the
    slow bernoulli_, so the same math is written out here with the numpy mask."""
    if not 0 < dropout_p < 1 or not eager_cpu(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-1, -2)).mul_(1 / math.sqrt(q.shape[-1])).masked_fill_(~mask, float("-inf"))
    return cpu_dropout(scores.softmax(dim=-1), dropout_p) @ v
