"""BERT for pretraining: embeddings -> encoder -> (MLM head on masked positions, NSP head on the pooler)."""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from bertds.model.config import BertConfig
from bertds.model.cpu_fastpath import eager_cpu
from bertds.model.heads import BertMLMHead, BertNSPHead
from bertds.model.layers import BertEmbeddings, BertEncoder, BertPooler, TokenLayout


class BertForPreTrainingOutput(NamedTuple):
    """What ``BertForPreTraining`` returns (a NamedTuple, so DeepSpeed's ZeRO-3 hooks and torch.compile see its
    tensors). The losses are set when their labels are given (NSP/SOP only with ``config.sentence_loss``); ``loss`` is
    their sum, what the step backpropagates.
    ``prediction_logits`` (B, P, V) exist only with ``return_logits=True``: otherwise the MLM loss comes from the
    fused vocabulary projection + cross-entropy over the real prediction slots."""

    loss: torch.Tensor | None
    mlm_loss: torch.Tensor | None
    nsp_loss: torch.Tensor | None
    mlm_correct: torch.Tensor | None  # real prediction slots whose label is the argmax
    mlm_count: torch.Tensor | None  # real prediction slots (the sum of mlm_weights)
    nsp_correct: torch.Tensor | None  # pairs whose NSP label is the argmax
    prediction_logits: torch.Tensor | None
    seq_relationship_logits: torch.Tensor
    last_hidden_state: torch.Tensor


class BertModel(nn.Module):
    """The BERT body: what fine-tuning and representations use."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(
        self, tokens: torch.Tensor, segments: torch.Tensor, valid_lens: torch.Tensor, unpad: bool | None = None
    ) -> torch.Tensor:
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

    def forward(
        self,
        tokens: torch.Tensor,
        segments: torch.Tensor,
        valid_len: torch.Tensor,
        pred_positions: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        mlm_weights: torch.Tensor | None = None,
        nsp_label: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> BertForPreTrainingOutput:
        """Takes a batch's columns by name (``model(**batch)``). The MLM loss is d2l's weighted mean
        cross-entropy sum(w · CE) / (sum(w) + 1e-8) over the prediction slots, the NSP loss a mean cross-entropy."""
        encoded = self.bert(tokens, segments, valid_len)
        nsp_logits = self.nsp(self.bert.pooler(encoded))
        logits = mlm_loss = mlm_correct = mlm_count = nsp_loss = nsp_correct = None
        if pred_positions is not None and (return_logits or mlm_labels is None):
            logits = self.mlm(encoded, pred_positions)
        if mlm_labels is not None:
            assert mlm_weights is not None, "mlm_labels come with mlm_weights"
            mlm_count = mlm_weights.sum()
            if logits is None:
                mlm_loss, mlm_correct = self.mlm(encoded, pred_positions, mlm_labels, mlm_weights)
            else:
                mlm_loss, mlm_correct = _mlm_loss_from_logits(logits, mlm_labels, mlm_weights)
        if nsp_label is not None and self.config.sentence_loss:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_label.long())
            nsp_correct = (nsp_logits.argmax(-1) == nsp_label).sum()
        terms = [term for term in (mlm_loss, nsp_loss) if term is not None]
        loss = cast(torch.Tensor, sum(terms)) if terms else None
        return BertForPreTrainingOutput(
            loss, mlm_loss, nsp_loss, mlm_correct, mlm_count, nsp_correct, logits, nsp_logits, encoded
        )


def _mlm_loss_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain path the fused loss is tested against: full (B, P, V) logits, then cross-entropy."""
    weights = weights.reshape(-1).float()
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.reshape(-1).long(), reduction="none")
    with torch.no_grad():
        correct = ((logits.argmax(-1).reshape(-1) == labels.reshape(-1)).float() * weights).sum()
    return (ce * weights).sum() / (weights.sum() + 1e-8), correct


def num_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
