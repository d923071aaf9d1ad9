"""d2l's pretraining examples (NSP sentence pairs, MLM masking), vectorised with Arrow compute and numpy.

Every example holds fixed-size arrays (``max_len`` tokens, ``max_predictions`` prediction slots):
``tokens`` ``<cls> A <sep> B <sep> <pad>...``, ``segments`` (0 for <cls> A <sep>, 1 for B <sep>, 0 for padding),
``valid_len``, ``pred_positions``/``mlm_labels``/``mlm_weights`` (weight 0 marks a padded slot) and
``nsp_label`` (1 = B really follows A). With dynamic masking the three MLM columns are drawn in the collator.

The corpus is held as one flat array of token ids with sentence offsets; a pair is two (start, length) ranges
into it, so pairing, truncation and packing are array operations rather than loops over tokens.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertds.data.masking import MASK_RATE, MaskingSpec, generator_uniforms, mask_tokens
from bertds.data.tokenizer import Vocab, segment_arange

__all__ = ["MASK_RATE", "ExampleConfig", "PairRanges", "d2l_examples", "pack_pairs", "pack_ranges",
           "truncate_longest_first", "D2LCorpus", "d2l_paragraphs"]

# Google's max_predictions_per_seq for the two standard lengths; elsewhere 15% of max_len, rounded up.
STANDARD_MAX_PREDICTIONS = {128: 20, 512: 80}
BLOCK_ROWS = 1 << 15  # pairs packed and masked together; part of the RNG stream, so changing it changes examples
_WORKERS = min(4, os.cpu_count() or 1)
_POOL = ThreadPoolExecutor(_WORKERS, thread_name_prefix="bertds-data")


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

    @property
    def max_predictions(self) -> int:
        if self.max_predictions_per_seq is not None:
            return self.max_predictions_per_seq
        if self.recipe == "bert":
            return STANDARD_MAX_PREDICTIONS.get(self.max_len, int(np.ceil(self.max_len * MASK_RATE)))
        return round(self.max_len * MASK_RATE)

    def masking(self, vocab: Vocab) -> MaskingSpec:
        return MaskingSpec(max_predictions=self.max_predictions, mask_id=vocab.mask_id,
                           first_random_id=vocab.first_regular_id, vocab_size=len(vocab),
                           rate_of_sequence=self.recipe == "bert", whole_word=self.whole_word_masking,
                           continuation=vocab.continuation_table() if self.whole_word_masking else None)


@dataclass
class PairRanges:
    """Sentence pairs as ranges into a flat token-id array: A = ids[a_start:a_start+a_len], B likewise."""

    a_start: np.ndarray
    a_len: np.ndarray
    b_start: np.ndarray
    b_len: np.ndarray
    label: np.ndarray  # nsp_label: 1 = B follows A in the document

    def select(self, keep: np.ndarray | slice) -> "PairRanges":
        return PairRanges(*(getattr(self, f)[keep] for f in ("a_start", "a_len", "b_start", "b_len", "label")))


def truncate_longest_first(a_len: np.ndarray, b_len: np.ndarray, max_tokens: int,
                           ties_cut_a: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """How many tokens to cut from A and from B: one at a time from the longer, until the pair fits."""
    excess = np.maximum(a_len + b_len - max_tokens, 0)
    cut_a = np.clip(a_len - b_len, 0, excess)
    cut_b = np.clip(b_len - a_len, 0, excess)
    rest = excess - cut_a - cut_b  # cut alternately from equal lengths, starting with A (or B)
    first, second = (rest + 1) // 2, rest // 2
    return (cut_a + first, cut_b + second) if ties_cut_a else (cut_a + second, cut_b + first)


def _truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Longest-first truncation of one pair (drop from the end of the longer until len(a) + len(b) fits)."""
    cut_a, cut_b = truncate_longest_first(np.asarray([len(a)]), np.asarray([len(b)]), max_tokens)
    return a[:len(a) - int(cut_a[0])], b[:len(b) - int(cut_b[0])]


def pack_ranges(ids: np.ndarray, pairs: PairRanges, vocab: Vocab, max_len: int):
    """``<cls> A <sep> B <sep>`` padded to max_len, gathered from ``ids``: (tokens, segments, valid_len)."""
    n = len(pairs.a_len)
    rows = np.arange(n, dtype=np.int64)
    tokens = np.full((n, max_len), vocab.pad_id, dtype=np.int32)
    segments = np.zeros((n, max_len), dtype=np.int8)
    valid_len = (pairs.a_len + pairs.b_len + 3).astype(np.int32)
    inner = segment_arange(pairs.a_len)
    tokens.reshape(-1)[np.repeat(rows * max_len + 1, pairs.a_len) + inner] = \
        ids[np.repeat(pairs.a_start, pairs.a_len) + inner]
    inner = segment_arange(pairs.b_len)
    into_b = np.repeat(rows * max_len + pairs.a_len + 2, pairs.b_len) + inner
    tokens.reshape(-1)[into_b] = ids[np.repeat(pairs.b_start, pairs.b_len) + inner]
    segments.reshape(-1)[into_b] = 1
    tokens[:, 0] = vocab.cls_id
    tokens[rows, pairs.a_len + 1] = vocab.sep_id
    tokens[rows, valid_len - 1] = vocab.sep_id
    segments[rows, valid_len - 1] = 1
    return tokens, segments, valid_len


def pack_pairs(firsts: list[list[int]], seconds: list[list[int]], vocab: Vocab, max_len: int):
    """``<cls> A <sep> B <sep>`` padded to max_len from token-id lists: (tokens, segments, valid_len, len_a)."""
    a_len = np.fromiter(map(len, firsts), dtype=np.int64, count=len(firsts))
    b_len = np.fromiter(map(len, seconds), dtype=np.int64, count=len(seconds))
    ids = np.fromiter((i for a, b in zip(firsts, seconds) for i in (*a, *b)), dtype=np.int32,
                      count=int(a_len.sum() + b_len.sum()))
    a_start = np.concatenate([[0], np.cumsum(a_len + b_len)[:-1]]).astype(np.int64)
    pairs = PairRanges(a_start, a_len, a_start + a_len, b_len, np.zeros(len(firsts), np.int8))
    tokens, segments, valid_len = pack_ranges(ids, pairs, vocab, max_len)
    return tokens, segments, valid_len, a_len.astype(np.int32)


def finish_examples(ids: np.ndarray, pairs: PairRanges, vocab: Vocab, config: ExampleConfig,
                    seed: list[int]) -> dict[str, np.ndarray]:
    """Packed (and, with static masking, masked) example columns of ``pairs``: blocks of BLOCK_ROWS pairs on
    a thread pool (numpy releases the GIL), block k masked with a generator seeded by (seed, k), so the result
    does not depend on the thread count."""
    masking = None if config.dynamic_masking else config.masking(vocab)

    def block(k: int) -> dict[str, np.ndarray]:
        part = pairs.select(slice(k * BLOCK_ROWS, (k + 1) * BLOCK_ROWS))
        tokens, segments, valid_len = pack_ranges(ids, part, vocab, config.max_len)
        columns = {"tokens": tokens, "segments": segments, "valid_len": valid_len,
                   "nsp_label": part.label.astype(np.int8)}
        if masking is not None:
            rng = np.random.default_rng([*seed, k])
            columns.update(mask_tokens(tokens, segments, valid_len, masking, generator_uniforms(rng)))
        return columns

    blocks = list(_POOL.map(block, range(max(1, -(-len(pairs.label) // BLOCK_ROWS)))))
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@dataclass
class D2LCorpus:
    """d2l's lines as arrays: sentences per line, words per sentence, and every word as an index into
    ``dictionary`` (the distinct lower-cased words, with their ``counts``). Paragraphs are lines with >= 2
    sentences."""

    paragraph_size: np.ndarray
    sentence_words: np.ndarray
    word_index: np.ndarray
    dictionary: pa.Array
    counts: np.ndarray

    def word_counts(self) -> dict[str, int]:
        return dict(zip(self.dictionary.to_pylist(), self.counts.tolist()))


def _d2l_part(lines: pa.Array):
    sentences = pc.split_pattern(pc.utf8_trim_whitespace(lines), " . ")
    words = pc.utf8_split_whitespace(pc.list_flatten(sentences))
    return (pc.list_value_length(sentences).to_numpy(zero_copy_only=False),
            pc.list_value_length(words).to_numpy(zero_copy_only=False), pc.dictionary_encode(pc.list_flatten(words)))


def d2l_paragraphs(lines: pa.Array) -> D2LCorpus:
    """d2l's ``_read_wiki``: stripped lines split into sentences on ' . ' and into lower-cased words. Parts of the
    corpus go to a thread pool (Arrow releases the GIL). Lower-casing is applied to the distinct words only (it
    changes no sentence or word boundary); lines with fewer than two sentences are dropped later."""
    step = -(-len(lines) // _WORKERS) or 1
    parts = list(_POOL.map(_d2l_part, [lines.slice(i, step) for i in range(0, max(len(lines), 1), step)]))
    encoded = pa.chunked_array([p[2] for p in parts]).unify_dictionaries()
    word_index = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in encoded.chunks])
    lowered = pc.dictionary_encode(pc.utf8_lower(encoded.chunks[0].dictionary))
    word_index = lowered.indices.to_numpy(zero_copy_only=False)[word_index]
    paragraph_size = np.concatenate([p[0] for p in parts]).astype(np.int64)
    sentence_words = np.concatenate([p[1] for p in parts]).astype(np.int64)
    in_paragraph = np.repeat(np.repeat(paragraph_size >= 2, paragraph_size), sentence_words)
    return D2LCorpus(paragraph_size, sentence_words, word_index, lowered.dictionary,
                     np.bincount(word_index[in_paragraph], minlength=len(lowered.dictionary)))


def d2l_examples(corpus: D2LCorpus, vocab: Vocab, config: ExampleConfig) -> dict[str, np.ndarray]:
    """d2l's NSP pairs and MLM masking for every adjacent sentence pair of every paragraph: B is the true next
    sentence with probability 0.5, else a random sentence of a random paragraph of the whole corpus (label 0).
    Pairs longer than max_len are dropped, or truncated (longest first) with ``config.truncate``."""
    rng = np.random.default_rng([config.seed, 2])
    ids, tokens_per_word = vocab.encode_indexed(corpus.dictionary, corpus.word_index)
    token_offsets = np.concatenate([[0], np.cumsum(corpus.sentence_words)])
    if tokens_per_word is not None:
        token_offsets = np.concatenate([[0], np.cumsum(tokens_per_word)])[token_offsets]
    sentence_start, sentence_len = token_offsets[:-1], np.diff(token_offsets)
    paragraph_start = np.concatenate([[0], np.cumsum(corpus.paragraph_size)])
    is_paragraph = corpus.paragraph_size >= 2  # d2l keeps lines with two or more sentences
    paragraph_start, paragraph_size = paragraph_start[:-1][is_paragraph], corpus.paragraph_size[is_paragraph]
    has_next = np.zeros(len(sentence_len) + 1, dtype=np.int32)  # +1 / -1 at paragraph ends, as a running sum
    np.add.at(has_next, paragraph_start, 1)
    np.add.at(has_next, paragraph_start + paragraph_size - 1, -1)
    first = np.flatnonzero(np.cumsum(has_next[:-1]) > 0)  # every sentence with a next one in its paragraph
    is_next = rng.random(len(first)) < 0.5
    random_paragraph = rng.integers(0, len(paragraph_size), len(first))
    random_sentence = paragraph_start[random_paragraph] + (
        rng.random(len(first)) * paragraph_size[random_paragraph]).astype(np.int64)
    second = np.where(is_next, first + 1, random_sentence)
    pairs = PairRanges(sentence_start[first], sentence_len[first], sentence_start[second], sentence_len[second],
                       is_next.astype(np.int8))
    max_tokens = config.max_len - 3
    if config.truncate:
        cut_a, cut_b = truncate_longest_first(pairs.a_len, pairs.b_len, max_tokens)
        pairs.a_len, pairs.b_len = pairs.a_len - cut_a, pairs.b_len - cut_b
    else:
        pairs = pairs.select(pairs.a_len + pairs.b_len <= max_tokens)
    return finish_examples(ids, pairs, vocab, config, [config.seed, 3])
