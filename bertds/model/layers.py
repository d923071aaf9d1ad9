"""BERT building blocks, named as in Hugging Face's modeling_bert: embeddings, encoder layers, pooler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bertds.model.config import BertConfig
from bertds.model.cpu_fastpath import Dropout, attention, eager_cpu, unpadded_attention


def key_padding_mask(valid_lens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(batch,) valid lengths -> (batch, 1, 1, seq_len) bool mask, True where a key may be attended to."""
    positions = torch.arange(seq_len, device=valid_lens.device)
    return (positions[None, :] < valid_lens[:, None]).view(-1, 1, 1, seq_len)


def _scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_zeros(rows, *x.shape[1:]).index_copy_(0, index, x)


class _Unpad(torch.autograd.Function):
    """x.index_select(0, index) for unique indices, whose gradient is a plain row copy into zeros (index_copy_)
    rather than index_select's scatter-add (slow on CPU, and the same sums: each row receives one gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _scatter_rows(grad, index, ctx.rows), None


class _Pad(torch.autograd.Function):
    """Rows ``index`` of a zero (rows, ...) grid set to x, in place on the fresh grid (no copy of it); gradient: the
    same rows of the grid's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return _scatter_rows(x, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


@dataclass
class TokenLayout:
    """Where the encoder's token rows live. Padded: the (batch, seq_len) grid, as the batch comes. Unpadded: only
    the valid tokens, stacked as (tokens, ...) rows, so the per-token work (projections, FFN, LayerNorm, dropout)
    skips the padding; attention scatters back to the grid. The padded positions' outputs are never read (keys are
    masked, the heads read valid positions), so both layouts compute the same thing for every valid token."""

    mask: torch.Tensor  # (batch, 1, 1, seq_len), True on valid tokens
    index: torch.Tensor | None  # unpadded: flat (batch * seq_len) positions of the valid tokens
    grid_rows: torch.Tensor | None = None  # unpadded: index // seq_len and index % seq_len
    grid_cols: torch.Tensor | None = None

    @classmethod
    def from_valid_lens(cls, valid_lens: torch.Tensor, seq_len: int, unpad: bool) -> TokenLayout:
        mask = key_padding_mask(valid_lens, seq_len)
        # nonzero() waits for the device, so accelerators keep the padded (static-shape) layout.
        if not unpad:
            return cls(mask, None)
        index = mask.reshape(-1).nonzero().squeeze(1)
        return cls(mask, index, index.div(seq_len, rounding_mode="floor"), index.remainder(seq_len))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.mask.shape[-1]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, ...) -> (tokens, ...); the identity in the padded layout."""
        if self.index is None:
            return x
        return _Unpad.apply(x.reshape(self.batch * self.seq_len, *x.shape[2:]), self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (batch, seq_len, ...) with zeros at the padding; the identity in the padded layout."""
        if self.index is None:
            return x
        return _Pad.apply(x, self.index, self.batch * self.seq_len).view(self.batch, self.seq_len, *x.shape[1:])

    def positions(self, device: torch.device) -> torch.Tensor:
        positions = torch.arange(self.seq_len, device=device)
        return positions if self.index is None else self.unpad(positions.expand(self.batch, -1))


class BertEmbeddings(nn.Module):
    """Token + segment + learned position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens) + self.token_type_embeddings(segments) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention on either token layout; the attention itself runs on the padded grid."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # fused query/key/value projection
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        p = self.attention_dropout if self.training else 0.0
        rows, cols = layout.grid_rows, layout.grid_cols
        if rows is not None and cols is not None and eager_cpu(x):
            return self.dense(unpadded_attention(self.qkv(x), rows, cols, layout.mask, self.num_heads, p))
        batch, seq_len, hidden = layout.batch, layout.seq_len, x.shape[-1]
        qkv = layout.pad(self.qkv(x)).view(batch, seq_len, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        out = attention(q, k, v, layout.mask, p)
        return self.dense(layout.unpad(out.transpose(1, 2).reshape(batch, seq_len, hidden)))


class BertLayer(nn.Module):
    """Post-LN transformer block (BERT's): x = LN(x + Attn(x)); x = LN(x + FFN(x)), GELU FFN. With
    ``config.pre_layernorm`` the LayerNorms move onto the branches, x = x + Attn(LN(x)); x = x + FFN(LN(x)), which
    keeps the residual stream unnormalised and trains stably at higher learning rates."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.ffn_size)
        self.output = nn.Linear(config.ffn_size, config.hidden_size)
        self.output_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)
        self.pre_layernorm = config.pre_layernorm

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.pre_layernorm:
            x = x + self.dropout(self.attention(self.attention_LayerNorm(x), layout))
            return x + self.dropout(self.feed_forward(self.output_LayerNorm(x)))
        x = self.attention_LayerNorm(x + self.dropout(self.attention(x, layout)))
        return self.output_LayerNorm(x + self.dropout(self.feed_forward(x)))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(F.gelu(self.intermediate(x)))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))
        # Pre-LN blocks leave the residual stream unnormalised: one LayerNorm after the last block.
        self.final_LayerNorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm else None
        )
        self.activation_checkpointing = False  # recompute each block in backward to save activation memory

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        for layer in self.layer:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout)
        return x if self.final_LayerNorm is None else self.final_LayerNorm(x)


class BertPooler(nn.Module):
    """tanh(W · h_<cls>): the sentence-level representation the NSP and classification heads read."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(encoded[:, 0]))
