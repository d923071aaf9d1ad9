"""Pretraining examples of any recipe: sentence pairs packed into fixed-size rows and (static masking) masked.

Every example holds fixed-size arrays (``max_len`` tokens, ``max_predictions`` prediction slots):
``tokens`` ``<cls> A <sep> B <sep> <pad>...``, ``segments`` (0 for <cls> A <sep>, 1 for B <sep>, 0 for padding),
``valid_len``, ``pred_positions``/``mlm_labels``/``mlm_weights`` (weight 0 marks a padded slot) and
``nsp_label`` (NSP: 1 = B really follows A; SOP: ALBERT's sentence order label, 0 = in order, 1 = swapped).
With dynamic masking the three MLM columns are drawn in the collator.

The corpus is held as one flat array of token ids with sentence offsets; a pair is two (start, length) ranges
into it, so pairing, truncation and packing are array operations rather than loops over tokens.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bertds.data.masking import MASK_RATE, GeneratorUniforms, MaskingSpec, mask_tokens
from bertds.data.tokenizer import Vocab

__all__ = [
    "MASK_RATE",
    "ExampleConfig",
    "PairRanges",
    "finish_examples",
    "pack_pairs",
    "pack_ranges",
    "truncate_longest_first",
    "truncate_pair",
    "worker_pool",
]

# Google's max_predictions_per_seq for the two standard lengths; elsewhere 15% of max_len, rounded up.
STANDARD_MAX_PREDICTIONS = {128: 20, 512: 80}
BLOCK_ROWS = 1 << 15  # pairs packed and masked together; part of the RNG stream, so changing it changes examples
POOL_WORKERS = min(4, os.cpu_count() or 1)


@functools.cache
def worker_pool() -> ThreadPoolExecutor:
    """The data package's thread pool (numpy and Arrow release the GIL), started at its first use."""
    return ThreadPoolExecutor(POOL_WORKERS, thread_name_prefix="bertds-data")


@dataclass(frozen=True)
class ExampleConfig:
    max_len: int = 64
    seed: int = 0
    truncate: bool = False  # d2l: False drops over-long pairs, True truncates the longer sentence first
    recipe: str = "d2l"  # "d2l" or "bert" (Google's create_pretraining_data)
    sentence_task: str = "nsp"  # "nsp", or "sop" (ALBERT's sentence order; bert recipe)
    short_seq_prob: float = 0.1  # bert recipe
    max_predictions_per_seq: int | None = None  # None: 15% of max_len (d2l), 20 at 128 / 80 at 512 (bert)
    whole_word_masking: bool = False
    dynamic_masking: bool = False  # True: no masks stored; the collator draws them every epoch
    dupe_factor: int = 1  # static masking: copies of the corpus with different pairs and masks (bert recipe)
    mask_prob: float = MASK_RATE  # share of each sequence's length predicted (MosaicBERT: 0.30)

    @property
    def max_predictions(self) -> int:
        if self.max_predictions_per_seq is not None:
            return self.max_predictions_per_seq
        if self.recipe == "bert":
            standard = STANDARD_MAX_PREDICTIONS.get(self.max_len) if self.mask_prob == MASK_RATE else None
            return standard or int(np.ceil(self.max_len * self.mask_prob))
        return round(self.max_len * self.mask_prob)

    def masking(self, vocab: Vocab) -> MaskingSpec:
        return MaskingSpec(
            max_predictions=self.max_predictions,
            mask_id=vocab.mask_id,
            first_random_id=vocab.first_regular_id,
            vocab_size=len(vocab),
            whole_word=self.whole_word_masking,
            mask_prob=self.mask_prob,
            continuation=vocab.continuation_table() if self.whole_word_masking else None,
        )


@dataclass
class PairRanges:
    """Sentence pairs as ranges into a flat token-id array: A = ids[a_start:a_start+a_len], B likewise."""

    a_start: np.ndarray
    a_len: np.ndarray
    b_start: np.ndarray
    b_len: np.ndarray
    label: np.ndarray  # nsp_label: NSP 1 = B follows A in the document; SOP 0 = in order, 1 = swapped

    def select(self, keep: np.ndarray | slice) -> PairRanges:
        return PairRanges(*(getattr(self, f)[keep] for f in ("a_start", "a_len", "b_start", "b_len", "label")))


def truncate_longest_first(
    a_len: np.ndarray, b_len: np.ndarray, max_tokens: int, ties_cut_a: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """How many tokens to cut from A and from B: one at a time from the longer, until the pair fits."""
    excess = np.maximum(a_len + b_len - max_tokens, 0)
    cut_a = np.clip(a_len - b_len, 0, excess)
    cut_b = np.clip(b_len - a_len, 0, excess)
    rest = excess - cut_a - cut_b  # cut alternately from equal lengths, starting with A (or B)
    first, second = (rest + 1) // 2, rest // 2
    return (cut_a + first, cut_b + second) if ties_cut_a else (cut_a + second, cut_b + first)


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Longest-first truncation of one pair (drop from the end of the longer until len(a) + len(b) fits)."""
    cut_a, cut_b = truncate_longest_first(np.asarray([len(a)]), np.asarray([len(b)]), max_tokens)
    return a[: len(a) - int(cut_a[0])], b[: len(b) - int(cut_b[0])]


def pack_ranges(
    ids: np.ndarray,
    pairs: PairRanges,
    vocab: Vocab,
    max_len: int,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
):
    """``<cls> A <sep> B <sep>`` padded to max_len, gathered from ``ids``: (tokens, segments, valid_len), written
    into ``out`` (arrays of those shapes) when given."""
    n = len(pairs.a_len)
    rows = np.arange(n, dtype=np.int64)
    if out is None:
        out = (
            np.empty((n, max_len), dtype=np.int32),
            np.empty((n, max_len), dtype=np.int8),
            np.empty(n, dtype=np.int32),
        )
    tokens, segments, valid_len = out
    np.add(pairs.a_len + 3, pairs.b_len, out=valid_len, casting="unsafe")
    # A and B of all rows as one list of ranges: ids[source:source + length] go to tokens.flat[dest:dest + length].
    lengths = np.stack([pairs.a_len, pairs.b_len], axis=1).ravel()
    source = np.stack([pairs.a_start, pairs.b_start], axis=1).ravel()
    dest = np.stack([rows * max_len + 1, rows * max_len + pairs.a_len + 2], axis=1).ravel()
    before = np.cumsum(lengths) - lengths  # where each range begins in the list
    step = np.arange(int(lengths.sum()), dtype=np.int64)
    tokens.fill(vocab.pad_id)
    tokens.reshape(-1)[step + np.repeat(dest - before, lengths)] = ids[step + np.repeat(source - before, lengths)]
    tokens[:, 0] = vocab.cls_id
    tokens[rows, pairs.a_len + 1] = vocab.sep_id
    tokens[rows, valid_len - 1] = vocab.sep_id
    positions = np.arange(max_len)
    segments[...] = (positions >= (pairs.a_len + 2)[:, None]) & (positions < valid_len[:, None])  # B <sep>
    return tokens, segments, valid_len


def pack_pairs(firsts: list[list[int]], seconds: list[list[int]], vocab: Vocab, max_len: int):
    """``<cls> A <sep> B <sep>`` padded to max_len from token-id lists: (tokens, segments, valid_len, len_a)."""
    a_len = np.fromiter(map(len, firsts), dtype=np.int64, count=len(firsts))
    b_len = np.fromiter(map(len, seconds), dtype=np.int64, count=len(seconds))
    ids = np.fromiter(
        (i for a, b in zip(firsts, seconds) for i in (*a, *b)), dtype=np.int32, count=int(a_len.sum() + b_len.sum())
    )
    a_start = np.concatenate([[0], np.cumsum(a_len + b_len)[:-1]]).astype(np.int64)
    pairs = PairRanges(a_start, a_len, a_start + a_len, b_len, np.zeros(len(firsts), np.int8))
    tokens, segments, valid_len = pack_ranges(ids, pairs, vocab, max_len)
    return tokens, segments, valid_len, a_len.astype(np.int32)


def finish_examples(
    ids: np.ndarray, pairs: PairRanges, vocab: Vocab, config: ExampleConfig, seed: list[int]
) -> dict[str, np.ndarray]:
    """Packed (and, with static masking, masked) example columns of ``pairs``: blocks of BLOCK_ROWS pairs on
    a thread pool (numpy releases the GIL), each written in place into the output columns, block k masked with
    a generator seeded by (seed, k), so the result does not depend on the thread count."""
    masking = None if config.dynamic_masking else config.masking(vocab)
    n, max_len = len(pairs.label), config.max_len
    columns: dict[str, np.ndarray] = {
        "tokens": np.empty((n, max_len), dtype=np.int32),
        "segments": np.empty((n, max_len), dtype=np.int8),
        "valid_len": np.empty(n, dtype=np.int32),
        "nsp_label": pairs.label.astype(np.int8),
    }
    if masking is not None:
        slots = masking.max_predictions
        columns.update(
            pred_positions=np.empty((n, slots), dtype=np.int32),
            mlm_labels=np.empty((n, slots), dtype=np.int32),
            mlm_weights=np.empty((n, slots), dtype=np.float32),
        )

    def block(k: int) -> None:
        rows = slice(k * BLOCK_ROWS, (k + 1) * BLOCK_ROWS)
        out = {name: column[rows] for name, column in columns.items()}
        tokens, segments, valid_len = pack_ranges(
            ids, pairs.select(rows), vocab, max_len, (out["tokens"], out["segments"], out["valid_len"])
        )
        if masking is not None:
            rng = np.random.default_rng([*seed, k])
            mask_tokens(tokens, segments, valid_len, masking, GeneratorUniforms(rng), out=out)

    list(worker_pool().map(block, range(-(-n // BLOCK_ROWS))))
    return columns
