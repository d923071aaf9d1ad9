"""BERT representations of a text or a text pair (d2l's ``get_bert_encoding``)."""
from __future__ import annotations

import torch

from bertds.data.tokenizer import Vocab
from bertds.model import BertForPreTraining


def _as_tokens(text: str | list[str]) -> list[str]:
    return text.lower().split() if isinstance(text, str) else [t.lower() for t in text]


@torch.no_grad()
def encode(model: BertForPreTraining, vocab: Vocab, tokens_a: str | list[str],
           tokens_b: str | list[str] | None = None) -> torch.Tensor:
    """Encodings of ``<cls> A <sep> [B <sep>]``, shape (1, L, hidden). Texts are lists of tokens or strings
    split on whitespace."""
    a = _as_tokens(tokens_a)
    b = _as_tokens(tokens_b) if tokens_b is not None else []
    ids = [vocab.cls_id, *vocab.token_ids(a), vocab.sep_id]
    segments = [0] * len(ids)
    if tokens_b is not None:
        ids += [*vocab.token_ids(b), vocab.sep_id]
        segments += [1] * (len(b) + 1)
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    encoded, _, _ = model(tokens, torch.tensor([segments], device=device),
                          torch.tensor([len(ids)], device=device))
    return encoded
