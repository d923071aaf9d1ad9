"""Eager-CPU fast paths of the model, each computing what its general counterpart computes: dropout with masks
drawn by numpy (torch's CPU bernoulli_ is slow) and attention written out where SDPA would fall back to its math
path with that slow mask. torch.compile and accelerators never take them (they generate or have their own kernels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def eager_cpu(x: torch.Tensor) -> bool:
    """True where the CPU fast paths apply: eager CPU tensors (torch.compile generates its own kernels)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class Dropout(nn.Dropout):
    """nn.Dropout, the same distribution (keep with probability 1 - p, scale by 1 / (1 - p)), with the CPU mask from
    ``cpu_keep_mask`` in eager CPU training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or not eager_cpu(x):
            return super().forward(x)
        return cpu_dropout(x, self.p)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return x.mul(cpu_keep_mask(x.shape, p)).mul_(1 / (1 - p))


def cpu_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) as 32-bit uniform integers >= p·2³², drawn by numpy's PCG64 (both halves of its 64-bit
    outputs), single-threaded. The seed comes from torch's generator, so torch.manual_seed fixes the masks."""
    n = math.prod(shape)
    bits = np.random.PCG64(int(torch.randint(2**62, ()))).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(bits >= np.uint32(round(p * 2**32))).view(shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d), masked) v on (batch, heads, seq_len, head_dim). SDPA (flash / memory-efficient
    kernels) everywhere, except eager CPU training with attention dropout: SDPA then takes its math path with the
    slow bernoulli_, so the same math is written out here with the numpy mask."""
    if not 0 < dropout_p < 1 or not eager_cpu(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-1, -2)).mul_(1 / math.sqrt(q.shape[-1])).masked_fill_(~mask, float("-inf"))
    return cpu_dropout(scores.softmax(dim=-1), dropout_p) @ v
