"""Pretraining heads: masked language model (on gathered positions) and next sentence prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertds.model.config import BertConfig

LOSS_CHUNK = 256  # prediction rows per chunk of the fused vocabulary projection + cross-entropy: small enough for
# the (chunk, vocab) buffer to stay in cache through its passes, large enough for efficient matmuls


class _LinearCrossEntropy(torch.autograd.Function):
    """(sum_i scale_i · CE(x_i Wᵀ + b, label_i), rows whose argmax is the label) in row chunks, so the (rows, vocab)
    logits never exist whole. The output is a scalar, so the gradients are computed in forward from each chunk's
    softmax (as Liger-Kernel's fused linear cross-entropy) and backward only scales them; each chunk stays in one
    buffer, updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, scale, grad_enabled):
        grads = grad_enabled and any(ctx.needs_input_grad[:3])  # needs_input_grad ignores torch.no_grad()
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        correct = torch.zeros((), device=x.device, dtype=torch.float32)
        unused = x.new_empty(0)  # in place of the gradients when none are needed
        grad_x = torch.empty_like(x) if grads else unused
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads else unused
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if grads else unused
        # One fp32 buffer for every chunk's logits: a fresh (chunk, vocab) tensor per chunk is costly on CPU.
        buffer = torch.empty(min(LOSS_CHUNK, x.shape[0]), weight.shape[0], device=x.device, dtype=torch.float32)
        for start in range(0, x.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            chunk = x[rows]
            logits = buffer[: chunk.shape[0]]
            if x.dtype == torch.float32:
                torch.addmm(bias, chunk, weight.t(), out=logits)
            else:  # 16-bit matmul, fp32 softmax
                logits.copy_(torch.addmm(bias, chunk, weight.t()))
            target = logits.gather(1, labels[rows, None]).squeeze(1)
            top = logits.amax(dim=-1)  # amax: no argmax indices to write
            correct += ((target >= top) & (scale[rows] > 0)).sum()  # the label is the argmax
            probs = softmax_in_place(logits)  # one (chunk, vocab) buffer for logits, probabilities and gradient
            top_prob = probs.amax(dim=-1)  # softmax keeps the order: its max sits at the max logit
            loss += (log_normalizer(top, top_prob) - target).mul(scale[rows]).sum()
            if grads:  # d loss / d logits = scale · (softmax - onehot)
                g = probs.mul_(scale[rows, None])
                g[torch.arange(g.shape[0], device=g.device), labels[rows]] -= scale[rows]
                grad_b += g.sum(0)
                if x.dtype == torch.float32:
                    grad_w.addmm_(g.t(), chunk)
                    torch.mm(g, weight, out=grad_x[rows])
                else:  # both matmuls in 16 bits (fp32 accumulation inside), as autocast would run them
                    g16 = g.to(x.dtype)
                    grad_w += g16.t() @ chunk
                    grad_x[rows] = g16 @ weight
        if grads:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_x, grad_w, grad_b = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return grad_x, grad_w, grad_b, None, None, None


def softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, written over ``logits``: torch's kernel works row by row, each row staying in
    cache through its max, exp, sum and scaling (separate whole-tensor ops would stream the chunk through memory once
    per op)."""
    return torch._softmax(logits, -1, False, out=logits)


def log_normalizer(top: torch.Tensor, top_prob: torch.Tensor) -> torch.Tensor:
    """log Σ_j exp(logits_j) per row, from the row's max logit ``top`` and the softmax at that logit (the row's
    largest probability): it is exp(top - log Σ), at least 1 / vocab, so its log loses
    nothing to underflow."""
    return top - top_prob.log()


class MLMDecoder(nn.Linear):
    """The vocabulary projection; given labels it returns (weighted cross-entropy, number of rows predicted right)
    instead of the logits."""

    # The override differs from nn.Linear's on purpose: given labels it returns (loss, correct), not logits.
    def forward(  # type: ignore[override]
        self, x: torch.Tensor, labels: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if labels is None:
            return super().forward(x)
        return _LinearCrossEntropy.apply(x, self.weight, self.bias, labels, scale, torch.is_grad_enabled())


class BertMLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> vocabulary projection (the decoder weight is tied to the token embedding)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = MLMDecoder(config.hidden_size, config.vocab_size)

    def forward(
        self,
        encoded: torch.Tensor,
        pred_positions: torch.Tensor,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, P, V) at ``pred_positions``; given ``labels`` and ``weights`` (B, P) instead (d2l's MLM loss
        sum(w · CE) / (sum(w) + 1e-8), real slots predicted right), without materialising the logits."""
        # Gather the prediction positions first: the vocabulary projection, the largest matmul of the model,
        # then runs on ~15% of the tokens instead of all of them.
        if labels is None:
            index = pred_positions.long().unsqueeze(-1).expand(-1, -1, encoded.shape[-1])
            return self.decoder(self.transform(encoded.gather(1, index)))
        assert weights is not None, "labels come with weights"
        weights = weights.reshape(-1).float()
        scale, labels = weights / (weights.sum() + 1e-8), labels.reshape(-1).long()
        rows = torch.arange(encoded.shape[0], device=encoded.device).repeat_interleave(pred_positions.shape[1])
        positions = pred_positions.reshape(-1).long()
        if weights.device.type == "cpu":
            # Skip the padded slots (weight 0, a third on WikiText-2). `nonzero` would stall an accelerator's
            # queue, so there they are computed with scale 0 instead.
            keep = weights.nonzero().squeeze(1)
            rows, positions, scale, labels = rows[keep], positions[keep], scale[keep], labels[keep]
        return self.decoder(self.transform(encoded[rows, positions]), labels, scale)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertNSPHead(nn.Module):
    """Two-way classifier (is next / is not next) on the pooled <cls> representation."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.seq_relationship(pooled)
