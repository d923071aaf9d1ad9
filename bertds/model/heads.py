"""Pretraining heads: masked language model (on gathered positions) and next sentence prediction."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertds.model.config import BertConfig


class BertMLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> vocabulary projection (the decoder weight is tied to the token embedding)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, encoded: torch.Tensor, pred_positions: torch.Tensor) -> torch.Tensor:
        # Gather the prediction positions first: the vocabulary projection, the largest matmul of the model,
        # then runs on ~15% of the tokens instead of all of them.
        index = pred_positions.long().unsqueeze(-1).expand(-1, -1, encoded.shape[-1])
        selected = encoded.gather(1, index)
        return self.decoder(self.LayerNorm(F.gelu(self.dense(selected))))


class BertNSPHead(nn.Module):
    """Two-way classifier (is next / is not next) on the pooled <cls> representation."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.seq_relationship(pooled)
