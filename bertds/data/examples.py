"""d2l's pretraining examples (NSP sentence pairs, MLM masking), vectorised with Arrow compute and numpy.

Every example holds fixed-size arrays (``max_len`` tokens, ``max_predictions`` prediction slots):
``tokens`` ``<cls> A <sep> B <sep> <pad>...``, ``segments`` (0 for <cls> A <sep>, 1 for B <sep>, 0 for padding),
``valid_len``, ``pred_positions``/``mlm_labels``/``mlm_weights`` (weight 0 marks a padded slot) and
``nsp_label`` (1 = B really follows A). With dynamic masking the three MLM columns are drawn in the collator.

The corpus is held as one flat array of token ids with sentence offsets; a pair is two (start, length) ranges
into it, so pairing, truncation and packing are array operations rather than loops over tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertds.data.masking import MASK_RATE, MaskingSpec, generator_uniforms, mask_tokens
from bertds.data.tokenizer import Vocab

__all__ = ["MASK_RATE", "ExampleConfig", "PairRanges", "d2l_examples", "pack_pairs", "pack_ranges",
           "truncate_longest_first"]

# Google's max_predictions_per_seq for the two standard lengths; elsewhere 15% of max_len, rounded up.
STANDARD_MAX_PREDICTIONS = {128: 20, 512: 80}


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

    def select(self, keep: np.ndarray) -> "PairRanges":
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
    positions = np.arange(max_len)[None, :]
    a_len, b_len = pairs.a_len[:, None], pairs.b_len[:, None]
    valid_len = (pairs.a_len + pairs.b_len + 3).astype(np.int32)
    in_a = (positions >= 1) & (positions <= a_len)
    in_b = (positions >= a_len + 2) & (positions < a_len + 2 + b_len)
    source = np.where(positions <= a_len, pairs.a_start[:, None] + positions - 1,
                      pairs.b_start[:, None] + positions - a_len - 2)
    gathered = ids[np.clip(source, 0, max(len(ids) - 1, 0))] if len(ids) else np.zeros((n, max_len), np.int32)
    tokens = np.where(in_a | in_b, gathered, vocab.pad_id).astype(np.int32)
    tokens[:, 0] = vocab.cls_id
    rows = np.arange(n)
    tokens[rows, pairs.a_len + 1] = vocab.sep_id
    tokens[rows, valid_len - 1] = vocab.sep_id
    segments = (in_b | (positions == valid_len[:, None] - 1)).astype(np.int8)
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
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Packed (and, with static masking, masked) example columns of ``pairs``."""
    tokens, segments, valid_len = pack_ranges(ids, pairs, vocab, config.max_len)
    columns = {"tokens": tokens, "segments": segments, "valid_len": valid_len,
               "nsp_label": pairs.label.astype(np.int8)}
    if not config.dynamic_masking:
        columns.update(mask_tokens(tokens, segments, valid_len, config.masking(vocab), generator_uniforms(rng)))
    return columns


def d2l_paragraphs(lines: pa.Array) -> pa.ListArray:
    """d2l's ``_read_wiki``: lower-cased, stripped lines split into sentences on ' . ', kept when they have two or
    more sentences. A list (paragraph) of lists (sentence) of words."""
    sentences = pc.split_pattern(pc.utf8_trim_whitespace(pc.utf8_lower(lines)), " . ")
    paragraphs = pc.filter(sentences, pc.greater_equal(pc.list_value_length(sentences), 2))
    words = pc.utf8_split_whitespace(pc.list_flatten(paragraphs))
    return pa.ListArray.from_arrays(paragraphs.offsets.to_numpy() - paragraphs.offsets[0].as_py(), words)


def d2l_word_counts(paragraphs: pa.ListArray) -> dict[str, int]:
    words = pc.dictionary_encode(pc.list_flatten(pc.list_flatten(paragraphs)))
    counts = np.bincount(words.indices.to_numpy(zero_copy_only=False), minlength=len(words.dictionary))
    return dict(zip(words.dictionary.to_pylist(), counts.tolist()))


def d2l_examples(paragraphs: pa.ListArray, vocab: Vocab, config: ExampleConfig) -> dict[str, np.ndarray]:
    """d2l's NSP pairs and MLM masking for every adjacent sentence pair of every paragraph: B is the true next
    sentence with probability 0.5, else a random sentence of a random paragraph of the whole corpus (label 0).
    Pairs longer than max_len are dropped, or truncated (longest first) with ``config.truncate``."""
    rng = np.random.default_rng([config.seed, 2])
    sentences = pc.list_flatten(paragraphs)
    ids, tokens_per_word = vocab.encode_words(pc.list_flatten(sentences))
    word_offsets = sentences.offsets.to_numpy().astype(np.int64) - sentences.offsets[0].as_py()
    token_offsets = np.concatenate([[0], np.cumsum(tokens_per_word)])[word_offsets]
    sentence_start, sentence_len = token_offsets[:-1], np.diff(token_offsets)
    paragraph_start = paragraphs.offsets.to_numpy().astype(np.int64)
    paragraph_size = np.diff(paragraph_start)
    is_last = np.zeros(len(sentence_len), dtype=bool)
    is_last[paragraph_start[1:] - 1] = True
    first = np.flatnonzero(~is_last)  # every sentence that has a next one in its paragraph
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
    return finish_examples(ids, pairs, vocab, config, rng)
