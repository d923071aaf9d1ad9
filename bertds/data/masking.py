"""BERT's MLM masking, vectorised over a batch of packed pairs, with two sources of randomness:

- static: a ``numpy.random.Generator`` at preparation time (masks fixed in the prepared data);
- dynamic: a counter-based hash of (seed, epoch, example index, position), drawn in the collator every epoch
  (RoBERTa). The masks are a pure function of those numbers, so a resumed run masks exactly as an uninterrupted one,
  whatever the worker count or the batch an example lands in.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

MASK_RATE = 0.15  # of the tokens, as BERT and d2l
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1  # of the chosen positions; the remaining 10% stay unchanged

# draw(stream, shape) -> uniform floats in [0, 1); stream 0: position keys, 1: replacement kind, 2: random token.
Uniforms = Callable[[int, tuple[int, int]], np.ndarray]


@dataclass(frozen=True)
class MaskingSpec:
    max_predictions: int
    mask_id: int
    first_random_id: int  # random replacements come from [first_random_id, vocab_size): never a special token
    vocab_size: int
    rate_of_sequence: bool = False  # False: 15% of the non-special tokens (d2l); True: of the sequence (Google)
    whole_word: bool = False
    continuation: np.ndarray | None = field(default=None, compare=False, repr=False)  # [vocab] bool, whole_word

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "continuation"}


def generator_uniforms(rng: np.random.Generator) -> Uniforms:
    return lambda stream, shape: rng.random(shape, dtype=np.float32)


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hashed_uniforms(seed: int, epoch: int, example_index: np.ndarray) -> Uniforms:
    """Uniforms that depend only on (seed, epoch, example index, stream, column)."""
    with np.errstate(over="ignore"):
        base = _splitmix(_splitmix(np.asarray([seed], dtype=np.uint64)) ^ np.uint64(epoch))
        rows = _splitmix(base ^ np.asarray(example_index, dtype=np.uint64))[:, None]

    def draw(stream: int, shape: tuple[int, int]) -> np.ndarray:
        columns = (np.uint64(stream) << np.uint64(32)) | np.arange(shape[1], dtype=np.uint64)
        with np.errstate(over="ignore"):
            bits = _splitmix(rows ^ _splitmix(columns)[None, :])
        return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    return draw


def special_positions(segments: np.ndarray, valid_len: np.ndarray) -> np.ndarray:
    """<cls>, both <sep> and padding of packed ``<cls> A <sep> B <sep>`` rows."""
    positions = np.arange(segments.shape[1])
    first_b = np.argmax(segments, axis=1)[:, None]  # B starts right after A's <sep>
    return (positions == 0) | (positions == first_b - 1) | (positions >= valid_len[:, None] - 1)


def _whole_word_choice(tokens, special, keys, num_preds, continuation, max_predictions):
    """Positions of whole words taken in random word order while they fit in num_preds (Google's whole-word
    masking, which stops at the first word that does not fit rather than trying smaller ones after it)."""
    n, max_len = tokens.shape
    positions = np.broadcast_to(np.arange(max_len), (n, max_len))
    starts_word = ~continuation[tokens] | special | np.pad(special, ((0, 0), (1, 0)))[:, :-1]
    word_start = np.maximum.accumulate(np.where(starts_word, positions, 0), axis=1)
    # A word ends right before the next word start (or at the row end).
    next_start = np.minimum.accumulate(np.where(starts_word, positions, max_len)[:, ::-1], axis=1)[:, ::-1]
    word_end = np.concatenate([next_start[:, 1:], np.full((n, 1), max_len)], axis=1) - 1
    rows = np.arange(n)[:, None]
    word_key = keys[rows, word_start]
    order = np.lexsort((positions, word_key), axis=1)
    sorted_pos = np.take_along_axis(positions, order, axis=1)
    remaining_in_word = word_end[rows, sorted_pos] - sorted_pos
    word_done_count = np.arange(1, max_len + 1)[None, :] + remaining_in_word
    take = (word_done_count <= num_preds[:, None]) & ~special[rows, sorted_pos]
    chosen = np.sort(np.where(take, sorted_pos, max_len), axis=1)[:, :max_predictions]
    return chosen


def mask_tokens(tokens: np.ndarray, segments: np.ndarray, valid_len: np.ndarray, spec: MaskingSpec,
                uniforms: Uniforms) -> dict[str, np.ndarray]:
    """Choose 15% of the positions (at least one, at most ``max_predictions``, never a special token); of those,
    80% become the mask token, 10% a random token, 10% stay. ``tokens`` is modified in place."""
    n, max_len = tokens.shape
    slots = spec.max_predictions
    special = special_positions(segments, valid_len)
    num_candidates = (~special).sum(axis=1)
    base = valid_len if spec.rate_of_sequence else num_candidates
    num_preds = np.minimum(np.clip(np.round(base * MASK_RATE), 1, slots), num_candidates).astype(np.int64)
    keys = uniforms(0, (n, max_len))
    keys[special] = 2.0  # special positions sort last
    if spec.whole_word:
        chosen = _whole_word_choice(tokens, special, keys, num_preds, spec.continuation, slots)
    else:
        # The num_preds smallest keys of each row: a uniformly random subset of its candidates.
        lowest = np.argpartition(keys, slots - 1, axis=1)[:, :slots] if slots < max_len else \
            np.broadcast_to(np.arange(max_len), (n, max_len)).copy()
        ranked = np.take_along_axis(lowest, np.argsort(np.take_along_axis(keys, lowest, axis=1), axis=1), axis=1)
        in_use = np.arange(ranked.shape[1])[None, :] < num_preds[:, None]
        chosen = np.sort(np.where(in_use, ranked, max_len), axis=1)
        if chosen.shape[1] < slots:
            chosen = np.pad(chosen, ((0, 0), (0, slots - chosen.shape[1])), constant_values=max_len)
    is_pred = chosen < max_len  # real slots first, in position order
    pred_positions = np.where(is_pred, chosen, 0)
    rows = np.arange(n)[:, None]
    labels = np.where(is_pred, tokens[rows, pred_positions], 0)
    kind = uniforms(1, (n, slots))
    span = spec.vocab_size - spec.first_random_id
    random_tokens = spec.first_random_id + np.minimum((uniforms(2, (n, slots)) * span).astype(np.int64), span - 1)
    replacement = np.where(kind < MASK_TOKEN_SHARE, spec.mask_id,
                           np.where(kind < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE, random_tokens, labels))
    tokens[np.broadcast_to(rows, is_pred.shape)[is_pred], pred_positions[is_pred]] = replacement[is_pred]
    return {"pred_positions": pred_positions.astype(np.int32), "mlm_labels": labels.astype(np.int32),
            "mlm_weights": is_pred.astype(np.float32)}
