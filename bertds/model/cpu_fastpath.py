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


def unpadded_attention(
    qkv: torch.Tensor, grid_rows: torch.Tensor, grid_cols: torch.Tensor, mask: torch.Tensor, num_heads: int, p: float
) -> torch.Tensor:
    """``attention`` for token rows: (tokens, 3 · hidden) fused q/k/v rows -> (tokens, hidden) outputs, token t
    living at (grid_rows[t], grid_cols[t]) of the (batch, seq_len) grid; ``p`` the attention dropout (0: none)."""
    return _UnpaddedAttention.apply(qkv, grid_rows, grid_cols, mask, num_heads, p)


class _UnpaddedAttention(torch.autograd.Function):
    """The rows go straight into one head-major (3, batch, heads, seq_len, head_dim) grid, zero at the padding, and
    the backward writes the q/k/v gradients into one such grid, so no per-tensor copy or stacking happens in between;
    the padded rows stay zero (finite) so that they add exactly nothing."""

    @staticmethod
    def forward(ctx, qkv, grid_rows, grid_cols, mask, num_heads, p):
        tokens, head_dim = qkv.shape[0], qkv.shape[1] // (3 * num_heads)
        grid = qkv.new_zeros(3, mask.shape[0], num_heads, mask.shape[-1], head_dim)
        grid.permute(1, 3, 0, 2, 4)[grid_rows, grid_cols] = qkv.view(tokens, 3, num_heads, head_dim)
        q, k, v = grid.unbind(0)
        scores = (q @ k.transpose(-1, -2)).mul_(1 / math.sqrt(head_dim)).masked_fill_(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        drop = cpu_dropout_mask(probs.shape, p).to(probs.dtype) if 0 < p < 1 else None
        kept = probs if drop is None else probs * drop
        ctx.save_for_backward(grid, probs, kept, drop, grid_rows, grid_cols)
        return (kept @ v).transpose(1, 2)[grid_rows, grid_cols].reshape(tokens, -1)

    @staticmethod
    def backward(ctx, grad):
        grid, probs, kept, drop, grid_rows, grid_cols = ctx.saved_tensors
        q, k, v = grid.unbind(0)
        grad_out = grad.new_zeros(q.shape)
        grad_out.transpose(1, 2)[grid_rows, grid_cols] = grad.view(grad.shape[0], q.shape[1], q.shape[-1])
        grad_grid = torch.empty_like(grid)
        torch.matmul(kept.transpose(-1, -2), grad_out, out=grad_grid[2])
        grad_probs = grad_out @ v.transpose(-1, -2)
        if drop is not None:
            grad_probs.mul_(drop)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(1 / math.sqrt(q.shape[-1]))
        torch.matmul(grad_scores, k, out=grad_grid[0])
        torch.matmul(grad_scores.transpose(-1, -2), q, out=grad_grid[1])
        grad_qkv = grad_grid.permute(1, 3, 0, 2, 4)[grid_rows, grid_cols].reshape(grad.shape[0], -1)
        return grad_qkv, None, None, None, None, None
