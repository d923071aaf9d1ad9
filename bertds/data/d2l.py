"""d2l's pretraining data (``d2l.load_data_wiki``): the byte-level paragraph/sentence/word split of WikiText
lines (``_read_wiki``), and NSP sentence pairs of adjacent sentences, vectorised with Arrow compute and numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertds.data.corpus import Corpus
from bertds.data.examples import (
    POOL_WORKERS,
    ExampleConfig,
    PairRanges,
    finish_examples,
    truncate_longest_first,
    worker_pool,
)
from bertds.data.tokenizer import Vocab, segment_arange
from bertds.errors import UserError


@dataclass
class D2LCorpus:
    """d2l's lines as arrays: sentences per line, words per sentence, and every word as an index into
    ``dictionary`` (the distinct lower-cased words, with their ``counts``). Paragraphs (``is_paragraph``) are the
    lines d2l keeps: ``len(line.split(' . ')) >= 2`` on the raw line, so a one-sentence line ending in " . " is one
    (its words are counted and its sentence can be a random next sentence, but it has no pair of its own)."""

    paragraph_size: np.ndarray
    is_paragraph: np.ndarray
    sentence_words: np.ndarray
    word_index: np.ndarray
    dictionary: pa.Array
    counts: np.ndarray

    def word_counts(self) -> dict[str, int]:
        """Lower-cased word -> occurrences in paragraphs (words seen only outside paragraphs left out)."""
        return {w: n for w, n in zip(self.dictionary.to_pylist(), self.counts.tolist()) if n}


# Python's whitespace (str.split / str.strip, as d2l uses them): the ASCII bytes, and the UTF-8 forms of the others
# as big-endian integers of their bytes.
_WHITESPACE = [c for c in map(chr, range(0x3001)) if c.isspace()]
_ASCII_WHITESPACE = np.asarray([ord(c) for c in _WHITESPACE if ord(c) < 0x80], dtype=np.uint8)
_MULTIBYTE_WHITESPACE = {
    n: np.asarray([int.from_bytes(c.encode(), "big") for c in _WHITESPACE if len(c.encode()) == n], dtype=np.int64)
    for n in (2, 3)
}


def _whitespace_mask(data: np.ndarray) -> np.ndarray:
    """``data[i]`` is (a byte of) a whitespace character: bytes <= 0x20, less the control characters that are not
    whitespace, plus the bytes of the non-ASCII spaces."""
    ws = data <= 0x20
    rare = np.flatnonzero((data + np.uint8(0x3E)) < 0x5E)  # bytes < 0x20 or >= 0xC2, in one scan (uint8 wraps)
    control, lead = rare[data[rare] < 0x20], rare[data[rare] >= 0xC2]  # lead: first bytes of multi-byte characters
    ws[control[~np.isin(data[control], _ASCII_WHITESPACE)]] = False
    if len(lead):  # the non-ASCII spaces have 2 or 3 bytes
        following = data[np.minimum(lead[:, None] + np.arange(3), len(data) - 1)].astype(np.int64)
        code = following[:, 0]
        for n in (2, 3):
            code = (code << 8) | following[:, n - 1]
            space = lead[np.isin(code, _MULTIBYTE_WHITESPACE[n])]
            for k in range(n):
                ws[space + k] = True
    return ws


@dataclass
class _Part:
    """One slice of the lines: words dictionary-encoded as "word + the whitespace after it" (``variants``)."""

    paragraph_size: np.ndarray
    is_paragraph: np.ndarray
    sentence_words: np.ndarray
    variant_index: np.ndarray  # per word (separators dropped), into variants
    variants: pa.Array
    counts: np.ndarray  # per variant, words of paragraphs only


def _d2l_part(lines: pa.Array) -> _Part:
    """d2l's split of ``lines`` on the bytes: a word starts at a non-whitespace byte after whitespace or at a line
    start; a separator is a ' . ' inside the stripped line, non-overlapping from the left (str.split); a line is a
    paragraph when its raw text holds a ' . ' anywhere (d2l's test, before strip). The strings
    from one word start to the next (word + following whitespace) are dictionary-encoded without a copy."""
    lines = pc.fill_null(lines, "").cast(pa.large_string())
    _, offsets_buffer, data_buffer = lines.buffers()
    line_offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    begin = int(line_offsets[0]) if len(lines) else 0
    line_offsets = line_offsets - begin
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)[begin : begin + int(line_offsets[-1])]
        if len(lines)
        else np.zeros(0, dtype=np.uint8)
    )
    ws = _whitespace_mask(data)
    n = len(data)
    word_start = np.empty(n + 1, dtype=bool)  # and n: the word starts are then the offsets of the strings below
    np.invert(ws, out=word_start[:n])
    word_start[1:n] &= ws[:-1]
    line_start = line_offsets[:-1][line_offsets[:-1] < n]
    word_start[line_start] = ~ws[line_start]
    word_start[n] = True
    string_offsets = np.flatnonzero(word_start)
    starts = string_offsets[:-1]
    line_words = np.searchsorted(starts, line_offsets)  # words of line l: [line_words[l], line_words[l + 1])
    # Separators: a "." word between two spaces, with a word of the same line before and after it.
    word = np.flatnonzero(data[starts] == ord("."))
    dots = starts[word]
    spaced = (dots > 0) & (dots + 1 < n)
    spaced[spaced] = (data[dots[spaced] - 1] == ord(" ")) & (data[dots[spaced] + 1] == ord(" "))
    dots, word = dots[spaced], word[spaced]
    line = np.searchsorted(line_offsets, dots, side="right") - 1
    in_raw_line = (dots > line_offsets[line]) & (dots + 1 < line_offsets[line + 1])
    is_paragraph = np.bincount(line[in_raw_line], minlength=len(lines)) > 0
    inside = (word > line_words[line]) & (word + 1 < line_words[line + 1])
    dots, line, word = dots[inside], line[inside], word[inside]
    # Overlapping matches (" . . ") chain at distance 2: str.split takes every other one from the left.
    chained = np.diff(dots, prepend=-3) == 2
    chain_start = np.maximum.accumulate(np.where(chained, 0, np.arange(len(dots))))
    taken = (np.arange(len(dots)) - chain_start) % 2 == 0
    separator_line, separator_word = line[taken], word[taken]
    paragraph_size = 1 + np.bincount(separator_line, minlength=len(lines))
    begins = np.sort(np.concatenate([line_words[:-1], separator_word + 1]))
    ends = np.sort(np.concatenate([separator_word, line_words[1:]]))
    strings = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(string_offsets), pa.py_buffer(data))
    encoded = pc.dictionary_encode(strings)
    variant_index = encoded.indices.to_numpy()
    # Counts of the words of paragraphs: all words, less separators and the words of the other lines.
    single = np.flatnonzero(~is_paragraph)
    lengths = line_words[single + 1] - line_words[single]
    outside = np.concatenate([separator_word, np.repeat(line_words[single], lengths) + segment_arange(lengths)])
    counts = np.bincount(variant_index, minlength=len(encoded.dictionary)) - np.bincount(
        variant_index[outside], minlength=len(encoded.dictionary)
    )
    keep = np.ones(len(starts), dtype=bool)
    keep[separator_word] = False
    return _Part(paragraph_size, is_paragraph, ends - begins, variant_index[keep], encoded.dictionary, counts)


def d2l_paragraphs(lines: pa.Array) -> D2LCorpus:
    """d2l's ``_read_wiki``: stripped lines split into sentences on ' . ' and into lower-cased words. Parts of the
    corpus go to a thread pool (numpy and Arrow release the GIL). Stripping the whitespace after each word and
    lower-casing are applied to the distinct strings only (neither changes a sentence or word boundary); lines that
    are no paragraph are dropped later."""
    step = -(-len(lines) // POOL_WORKERS) or 1
    parts = list(worker_pool().map(_d2l_part, [lines.slice(i, step) for i in range(0, max(len(lines), 1), step)]))
    variants = pa.concat_arrays([p.variants for p in parts])
    lowered = pc.dictionary_encode(pc.utf8_lower(pc.utf8_rtrim_whitespace(variants)))
    word_of_variant = lowered.indices.to_numpy()
    first = np.cumsum([0] + [len(p.variants) for p in parts])
    counts = np.bincount(
        word_of_variant, weights=np.concatenate([p.counts for p in parts]), minlength=len(lowered.dictionary)
    ).astype(np.int64)
    word_index = np.empty(sum(len(p.variant_index) for p in parts), dtype=word_of_variant.dtype)
    bounds = np.cumsum([0] + [len(p.variant_index) for p in parts])

    def gather(k: int) -> None:
        np.take(
            word_of_variant[first[k] : first[k + 1]], parts[k].variant_index, out=word_index[bounds[k] : bounds[k + 1]]
        )

    list(worker_pool().map(gather, range(len(parts))))
    paragraph_size, is_paragraph, sentence_words = (
        np.concatenate([getattr(p, f) for p in parts]) for f in ("paragraph_size", "is_paragraph", "sentence_words")
    )
    return D2LCorpus(paragraph_size, is_paragraph, sentence_words, word_index, lowered.dictionary, counts)


def corpus_paragraphs(corpus: Corpus) -> D2LCorpus:
    """``d2l_paragraphs`` of the corpus' lines; a corpus without a paragraph of two sentences is refused."""
    paragraphs = d2l_paragraphs(corpus.lines())
    if not (paragraphs.paragraph_size >= 2).any():
        raise UserError(
            f"{corpus.describe()} has no paragraph with two or more sentences (sentences are "
            "separated by ' . '); check that it is WikiText-style text"
        )
    return paragraphs


def paragraph_sentences(corpus: Corpus) -> list[list[str]]:
    """d2l's paragraphs as sentence strings (``line.strip().lower().split(' . ')`` of the lines holding a ' . '),
    the words of a sentence joined by one space."""
    paragraphs = corpus_paragraphs(corpus)
    words = paragraphs.dictionary.take(pa.array(paragraphs.word_index)).to_pylist()
    word_end = np.cumsum(paragraphs.sentence_words).tolist()
    sentences = [" ".join(words[end - n : end]) for end, n in zip(word_end, paragraphs.sentence_words.tolist())]
    line_end = np.cumsum(paragraphs.paragraph_size).tolist()
    return [
        sentences[end - n : end]
        for end, n, keep in zip(line_end, paragraphs.paragraph_size.tolist(), paragraphs.is_paragraph.tolist())
        if keep
    ]


def d2l_examples(corpus: D2LCorpus, vocab: Vocab, config: ExampleConfig) -> dict[str, np.ndarray]:
    """d2l's NSP pairs and MLM masking for every adjacent sentence pair of every paragraph: B is the true next
    sentence with probability 0.5, else a random sentence of a random paragraph of the whole corpus (label 0;
    one-sentence paragraphs included, as d2l's ``random.choice(random.choice(paragraphs))``).
    Pairs longer than max_len are dropped, or truncated (longest first) with ``config.truncate``.
    With ``config.dupe_factor`` N the corpus is paired and masked N times with different draws (Google's
    dupe_factor), so N passes over the data meet new NSP negatives as well as new masks; copy 0 is d2l's."""
    ids, tokens_per_word = vocab.encode_indexed(corpus.dictionary, corpus.word_index)
    token_offsets = np.concatenate([[0], np.cumsum(corpus.sentence_words)])
    if tokens_per_word is not None:
        token_offsets = np.concatenate([[0], np.cumsum(tokens_per_word)])[token_offsets]
    sentences = np.stack([token_offsets[:-1], np.diff(token_offsets)])
    copies = []
    for copy in range(config.dupe_factor):
        stream = [] if copy == 0 else [copy]
        pairs = d2l_pairs(corpus, sentences, np.random.default_rng([config.seed, 2, *stream]), config)
        copies.append(finish_examples(ids, pairs, vocab, config, [config.seed, 3, *stream]))
    return {name: np.concatenate([c[name] for c in copies]) for name in copies[0]} if len(copies) > 1 else copies[0]


def d2l_pairs(corpus: D2LCorpus, sentences: np.ndarray, rng: np.random.Generator, config: ExampleConfig) -> PairRanges:
    """One draw of d2l's pairs; ``sentences`` holds each sentence's (start, length) in tokens."""
    sentence_start, sentence_len = sentences
    paragraph_start = np.concatenate([[0], np.cumsum(corpus.paragraph_size)])
    is_paragraph = corpus.is_paragraph
    paragraph_start, paragraph_size = paragraph_start[:-1][is_paragraph], corpus.paragraph_size[is_paragraph]
    has_next = np.zeros(len(sentence_len) + 1, dtype=np.int32)  # +1 / -1 at paragraph ends, as a running sum
    np.add.at(has_next, paragraph_start, 1)
    np.add.at(has_next, paragraph_start + paragraph_size - 1, -1)
    first = np.flatnonzero(np.cumsum(has_next[:-1]) > 0)  # every sentence with a next one in its paragraph
    is_next = rng.random(len(first)) < 0.5
    random_paragraph = rng.integers(0, len(paragraph_size), len(first))
    random_sentence = paragraph_start[random_paragraph] + (
        rng.random(len(first)) * paragraph_size[random_paragraph]
    ).astype(np.int64)
    second = np.where(is_next, first + 1, random_sentence)
    pairs = PairRanges(
        sentence_start[first],
        sentence_len[first],
        sentence_start[second],
        sentence_len[second],
        is_next.astype(np.int8),
    )
    max_tokens = config.max_len - 3
    if config.truncate:
        cut_a, cut_b = truncate_longest_first(pairs.a_len, pairs.b_len, max_tokens)
        pairs.a_len, pairs.b_len = pairs.a_len - cut_a, pairs.b_len - cut_b
        return pairs
    return pairs.select(pairs.a_len + pairs.b_len <= max_tokens)
