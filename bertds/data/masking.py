"""BERT's MLM masking, vectorised over a batch of packed pairs, with two sources of randomness:

- static: a ``numpy.random.Generator`` at preparation time (masks fixed in the prepared data);
- dynamic: a counter-based hash of (seed, epoch, example index, position), drawn in the collator every epoch
  (RoBERTa). The masks are a pure function of those numbers, so a resumed run masks exactly as an uninterrupted one,
  whatever the worker count or the batch an example lands in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

MASK_RATE = 0.15  # of the tokens, as BERT and d2l
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1  # of the chosen positions; the remaining 10% stay unchanged


@dataclass(frozen=True)
class MaskingSpec:
    max_predictions: int
    mask_id: int
    first_random_id: int  # random replacements come from [first_random_id, vocab_size): never a special token
    vocab_size: int
    whole_word: bool = False
    mask_prob: float = MASK_RATE  # share of the sequence's length chosen for prediction
    continuation: np.ndarray | None = field(default=None, compare=False, repr=False)  # [vocab] bool, whole_word

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "continuation"}


class Uniforms:
    """Uniform draws for masking, per stream (0: position keys, 1: replacement kind, 2: random token):
    ``draw(stream, shape)`` as floats in [0, 1), ``integers(stream, shape)`` as the same kind of draws times
    ``2**bits`` (exact integers below ``2**bits``)."""

    bits: int

    def draw(self, stream: int, shape: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def integers(self, stream: int, shape: tuple[int, int]) -> np.ndarray:
        return (self.draw(stream, shape) * (1 << self.bits)).astype(np.uint64)


class GeneratorUniforms(Uniforms):
    """Draws from a ``numpy.random.Generator`` (static masking): float32, 24 random bits."""

    bits = 24

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def draw(self, stream: int, shape: tuple[int, int]) -> np.ndarray:
        return self.rng.random(shape, dtype=np.float32)

    def integers(self, stream: int, shape: tuple[int, int]) -> np.ndarray:
        count = shape[0] * shape[1]
        if count % 2:
            return super().integers(stream, shape).astype(np.uint32)
        # random(float32) is (32-bit half of a 64-bit draw >> 8) / 2**24, low half first: the same numbers
        return (self.rng.bit_generator.random_raw(count // 2).view(np.uint32) >> 8).reshape(shape)


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class HashedUniforms(Uniforms):
    """Draws that depend only on (seed, epoch, example index, stream, column) (dynamic masking): 53 bits."""

    bits = 53

    def __init__(self, seed: int, epoch: int, example_index: np.ndarray):
        with np.errstate(over="ignore"):
            base = _splitmix(_splitmix(np.asarray([seed], dtype=np.uint64)) ^ np.uint64(epoch))
            self.rows = _splitmix(base ^ np.asarray(example_index, dtype=np.uint64))[:, None]

    def integers(self, stream: int, shape: tuple[int, int]) -> np.ndarray:
        columns = (np.uint64(stream) << np.uint64(32)) | np.arange(shape[1], dtype=np.uint64)
        with np.errstate(over="ignore"):
            return _splitmix(self.rows ^ _splitmix(columns)[None, :]) >> np.uint64(11)

    def draw(self, stream: int, shape: tuple[int, int]) -> np.ndarray:
        return self.integers(stream, shape).astype(np.float64) * (1.0 / (1 << 53))


def special_positions(segments: np.ndarray, valid_len: np.ndarray) -> np.ndarray:
    """<cls>, both <sep> and padding of packed ``<cls> A <sep> B <sep>`` rows."""
    n, max_len = segments.shape
    first_b = np.argmax(segments, axis=1)  # B starts right after A's <sep>
    special = np.arange(max_len) >= (np.asarray(valid_len) - 1)[:, None]
    special[:, 0] = True
    special[np.arange(n), np.maximum(first_b - 1, 0)] = True
    return special


def _whole_word_choice(tokens, special, keys, num_preds, continuation, max_predictions):
    """Positions of whole words taken in random word order, as Google's whole-word masking: a word that does not
    fit in what is left of num_preds is skipped and the next words are tried."""
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
    sorted_pos = np.take_along_axis(positions, order, axis=1)  # each word's pieces together, words in key order
    first_piece = (sorted_pos == word_start[rows, sorted_pos]) & ~special[rows, sorted_pos]
    size = np.where(first_piece, word_end[rows, sorted_pos] - sorted_pos + 1, 0)
    taken = np.zeros((n, max_len), dtype=bool)  # per first piece: its word is masked
    used = np.zeros(n, dtype=np.int64)
    for j in np.flatnonzero(first_piece.any(axis=0)):  # the greedy pass, vectorised over rows
        fits = first_piece[:, j] & (used + size[:, j] <= num_preds)
        taken[:, j] = fits
        used += np.where(fits, size[:, j], 0)
    word_of = np.maximum.accumulate(np.where(first_piece, np.arange(max_len), 0), axis=1)  # its first piece
    take = taken[rows, word_of] & ~special[rows, sorted_pos]
    return np.sort(np.where(take, sorted_pos, max_len), axis=1)[:, :max_predictions]


def _ranked_positions(uniforms: Uniforms, special: np.ndarray, count: int) -> np.ndarray:
    """Per row, the ``count`` positions with the smallest position keys, in key order (ties by position), special
    positions after all others: the keys are exact integers, with the position in the low bits, so one integer
    sort per row ranks them."""
    n, max_len = special.shape
    shift = (max_len - 1).bit_length()
    dtype = np.uint32 if uniforms.bits + 1 + shift <= 32 else np.uint64
    ranked = uniforms.integers(0, (n, max_len)).astype(dtype, copy=False)
    ranked[special] = 1 << uniforms.bits  # above every key
    ranked <<= dtype(shift)
    ranked |= np.arange(max_len, dtype=dtype)
    ranked.sort(axis=1)
    return (ranked[:, :count] & dtype((1 << shift) - 1)).astype(np.int64)


def mask_tokens(
    tokens: np.ndarray,
    segments: np.ndarray,
    valid_len: np.ndarray,
    spec: MaskingSpec,
    uniforms: Uniforms,
    out: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Choose ``spec.mask_prob`` (15%) of the sequence's length (<cls> and <sep> counted, as d2l's and Google's
    ``len(tokens)``; at least one, at most ``max_predictions``) among its non-special positions; of those, 80%
    become the mask token, 10% a random token, 10% stay. ``tokens`` is modified in place; the prediction columns are
    returned, written into ``out``'s arrays when given."""
    n, max_len = tokens.shape
    slots = spec.max_predictions
    special = special_positions(segments, valid_len)
    num_candidates = max_len - np.count_nonzero(special, axis=1)
    num_preds = np.minimum(np.clip(np.round(valid_len * spec.mask_prob), 1, slots), num_candidates).astype(np.int64)
    if spec.whole_word:
        keys = uniforms.draw(0, (n, max_len))
        keys[special] = 2.0  # special positions sort last
        chosen = _whole_word_choice(tokens, special, keys, num_preds, spec.continuation, slots)
    else:
        # The num_preds smallest keys of each row: a uniformly random subset of its candidates.
        ranked = _ranked_positions(uniforms, special, min(slots, max_len))
        in_use = np.arange(ranked.shape[1])[None, :] < num_preds[:, None]
        chosen = np.sort(np.where(in_use, ranked, max_len), axis=1)
        if chosen.shape[1] < slots:
            chosen = np.pad(chosen, ((0, 0), (0, slots - chosen.shape[1])), constant_values=max_len)
    is_pred = chosen < max_len  # real slots first, in position order
    pred_positions = np.where(is_pred, chosen, 0)
    rows = np.arange(n)[:, None]
    labels = np.where(is_pred, tokens[rows, pred_positions], 0)
    kind = uniforms.draw(1, (n, slots))
    span = spec.vocab_size - spec.first_random_id
    random_tokens = spec.first_random_id + np.minimum((uniforms.draw(2, (n, slots)) * span).astype(np.int64), span - 1)
    replacement = np.where(
        kind < MASK_TOKEN_SHARE,
        spec.mask_id,
        np.where(kind < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE, random_tokens, labels),
    )
    tokens[rows, pred_positions] = np.where(is_pred, replacement, tokens[:, :1])  # unused slots: <cls> at 0
    if out is None:
        out = {
            "pred_positions": np.empty((n, slots), np.int32),
            "mlm_labels": np.empty((n, slots), np.int32),
            "mlm_weights": np.empty((n, slots), np.float32),
        }
    out["pred_positions"][...] = pred_positions
    out["mlm_labels"][...] = labels
    out["mlm_weights"][...] = is_pred
    return {k: out[k] for k in ("pred_positions", "mlm_labels", "mlm_weights")}
