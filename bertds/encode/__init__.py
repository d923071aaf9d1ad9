"""BERT representations of a text or a text pair (d2l's ``get_bert_encoding``); the command line is
``python -m bertds.encode`` (``__main__.py``)."""
from __future__ import annotations

import torch

from bertds.data.tokenizer import Vocab
from bertds.model import BertForPreTraining


def _ids(vocab: Vocab, text: str | list[str]) -> list[int]:
    """A string goes through the vocabulary's own tokenizer (word-level or WordPiece); a list is already tokens."""
    return vocab.encode([text])[0] if isinstance(text, str) else vocab.token_ids([t.lower() for t in text])


def pack(vocab: Vocab, tokens_a: str | list[str],
         tokens_b: str | list[str] | None = None) -> tuple[list[int], list[int]]:
    """Token ids and segment ids of ``<cls> A <sep> [B <sep>]``."""
    ids = [vocab.cls_id, *_ids(vocab, tokens_a), vocab.sep_id]
    segments = [0] * len(ids)
    if tokens_b is not None:
        b = [*_ids(vocab, tokens_b), vocab.sep_id]
        ids, segments = ids + b, segments + [1] * len(b)
    return ids, segments


@torch.no_grad()
def encode(model: BertForPreTraining, vocab: Vocab, tokens_a: str | list[str],
           tokens_b: str | list[str] | None = None) -> torch.Tensor:
    """Encodings of ``<cls> A <sep> [B <sep>]``, shape (1, L, hidden), computed in eval mode. Texts are strings
    (tokenized by ``vocab``) or lists of tokens."""
    ids, segments = pack(vocab, tokens_a, tokens_b)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: the same input always gives the same vectors
    try:
        encoded = model(torch.tensor([ids], device=device), torch.tensor([segments], device=device),
                        torch.tensor([len(ids)], device=device)).last_hidden_state
    finally:
        model.train(was_training)
    return encoded
