"""BERT for pretraining: embeddings -> encoder -> (MLM head on masked positions, NSP head on the pooler)."""
from __future__ import annotations

import torch
from torch import nn

from bertds.model.config import BertConfig
from bertds.model.heads import BertMLMHead, BertNSPHead
from bertds.model.layers import BertEmbeddings, BertEncoder, BertPooler, TokenLayout, eager_cpu


class BertModel(nn.Module):
    """The BERT body: what fine-tuning and representations use."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor, valid_lens: torch.Tensor,
                unpad: bool | None = None) -> torch.Tensor:
        """(batch, seq_len, hidden) encodings; zeros at the padding when ``unpad``. Default: unpadded when training
        on CPU (the padding is a quarter of WikiText-2's tokens); accelerators and torch.compile keep static
        shapes, and inference keeps the padded positions' values, as Hugging Face's BERT computes them."""
        if unpad is None:
            unpad = self.training and eager_cpu(tokens)
        layout = TokenLayout.from_valid_lens(valid_lens, tokens.shape[1], unpad)
        x = self.embeddings(layout.unpad(tokens), layout.unpad(segments), layout.positions(tokens.device))
        return layout.pad(self.encoder(x, layout))


class BertForPreTraining(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm = BertMLMHead(config)
        self.nsp = BertNSPHead(config)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.mlm.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.bert.encoder.activation_checkpointing = enabled

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor, valid_lens: torch.Tensor,
                pred_positions: torch.Tensor | None = None, *, mlm_labels: torch.Tensor | None = None,
                mlm_weights: torch.Tensor | None = None):
        """Returns (encoded (B, L, H), mlm_logits (B, P, V) or None, nsp_logits (B, 2)). Given ``mlm_labels`` and
        ``mlm_weights`` (B, P), the second output is (MLM loss, number of real slots predicted right) instead: d2l's
        weighted mean cross-entropy from a fused vocabulary projection + cross-entropy over the real prediction
        slots, which never holds the (B, P, V) logits."""
        encoded = self.bert(tokens, segments, valid_lens)
        mlm = self.mlm(encoded, pred_positions, mlm_labels, mlm_weights) if pred_positions is not None else None
        nsp_logits = self.nsp(self.bert.pooler(encoded))
        return encoded, mlm, nsp_logits


def num_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
