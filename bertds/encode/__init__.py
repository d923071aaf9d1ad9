"""BERT representations of a text or a text pair (d2l's ``get_bert_encoding``); the command line is
``python -m bertds.encode`` (``__main__.py``).

A text longer than the model's positions is truncated as Hugging Face's ``truncation=True`` does: tokens come off
the end of the longer text, one at a time (of A when both are as long), until ``<cls> A <sep> [B <sep>]`` fits; a
``TruncatedInput`` warning says so. ``truncation=False`` refuses such a text instead.
"""

from __future__ import annotations

import warnings

import torch

from bertds.data.examples import truncate_pair
from bertds.data.tokenizer import Vocab
from bertds.errors import UserError
from bertds.model import BertForPreTraining


class TruncatedInput(UserWarning):
    """The text was cut to fit the model's positions."""


def _ids(vocab: Vocab, text: str | list[str]) -> list[int]:
    """A string goes through the vocabulary's own tokenizer (word-level or WordPiece); a list is already tokens."""
    return vocab.encode([text])[0] if isinstance(text, str) else vocab.token_ids([t.lower() for t in text])


def fit(a: list[int], b: list[int] | None, max_len: int) -> tuple[list[int], list[int] | None]:
    """A and B cut longest first (from the end, A first on ties) so that ``<cls> A <sep> [B <sep>]`` has at most
    max_len tokens."""
    return (a[: max_len - 2], None) if b is None else truncate_pair(a, b, max_len - 3)


def pack(
    vocab: Vocab, tokens_a: str | list[str], tokens_b: str | list[str] | None = None, max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and segment ids of ``<cls> A <sep> [B <sep>]``; with ``max_len``, truncated to it (a
    ``TruncatedInput`` warning)."""
    a = _ids(vocab, tokens_a)
    b = None if tokens_b is None else _ids(vocab, tokens_b)
    length = len(a) + 2 + (0 if b is None else len(b) + 1)
    if max_len is not None and length > max_len:
        a, b = fit(a, b, max_len)
        warnings.warn(
            f"the input has {length} tokens with <cls>/<sep>, more than the model's {max_len} positions; "
            f"truncated to {max_len} (the longer text loses its last tokens first)",
            TruncatedInput,
            stacklevel=2,
        )
    ids = [vocab.cls_id, *a, vocab.sep_id]
    segments = [0] * len(ids)
    if b is not None:
        ids, segments = ids + [*b, vocab.sep_id], segments + [1] * (len(b) + 1)
    return ids, segments


@torch.no_grad()
def encode_ids(model: BertForPreTraining, ids: list[int], segments: list[int]) -> torch.Tensor:
    """Encodings of packed token ids (``pack``), shape (1, L, hidden), computed in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: the same input always gives the same vectors
    try:
        encoded = model(
            torch.tensor([ids], device=device),
            torch.tensor([segments], device=device),
            torch.tensor([len(ids)], device=device),
        ).last_hidden_state
    finally:
        model.train(was_training)
    return encoded


def encode(
    model: BertForPreTraining,
    vocab: Vocab,
    tokens_a: str | list[str],
    tokens_b: str | list[str] | None = None,
    truncation: bool = True,
) -> torch.Tensor:
    """Encodings of ``<cls> A <sep> [B <sep>]``, shape (1, L, hidden), computed in eval mode. Texts are strings
    (tokenized by ``vocab``) or lists of tokens. A pair longer than the model's positions is truncated with a
    ``TruncatedInput`` warning, or with ``truncation=False`` refused (a UserError)."""
    max_len = model.config.max_position_embeddings
    ids, segments = pack(vocab, tokens_a, tokens_b, max_len if truncation else None)
    if len(ids) > max_len:
        raise UserError(
            f"the input has {len(ids)} tokens with <cls>/<sep>, more than the model's {max_len} "
            "positions; shorten it or pass truncation=True"
        )
    return encode_ids(model, ids, segments)
