"""Original-BERT pretraining examples (Google's ``create_pretraining_data.py``, ALBERT's for the sentence order).

Sentences: WikiText's text is tokenized, so its sentences end at the stand-alone tokens ``.``, ``!`` and ``?``; any
other text is split into sentences by ``sentencex`` (Wikimedia's rule-based segmenter: abbreviations, initials and
ellipses do not end a sentence).

Per document: segments (sentences) are gathered until ``target_seq_length`` tokens (``max_len - 3``, or with
probability ``short_seq_prob`` a random shorter length, drawn once per document as Google does), then cut at a
random sentence boundary into A and B. For NSP, B is the true continuation or (probability 0.5, and always when
the chunk holds a single sentence) the start of a random segment of another document of the pool (all documents,
or a window of chunks when streaming: ``prepare.document_windows``), label 0; the unused sentences go back to the
document. For SOP (ALBERT) B is the continuation, and the two are swapped with probability 0.5; a chunk of a single
sentence takes B from a random other document as for NSP. SOP labels are ALBERT's and Hugging Face's
``sentence_order_label``: 0 = in order, 1 = swapped (or random). Pairs are cut longest-first, a token at a time
from the front or the back at random, to ``max_len - 3``.

Sentences of a document are contiguous in a chunk's flat id array, so A and B are (start, length) ranges; the
loop below runs once per sentence, never per token.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencex

from bertds.data.examples import ExampleConfig, PairRanges, finish_examples, truncate_longest_first
from bertds.data.tokenizer import D2L_SPECIAL_TOKENS, Vocab, segment_arange

HEADING = r"^\s*=.*=\s*$"  # WikiText titles and section headings are not text
TOKENIZED_SENTENCE_END = r"( [.!?]) "  # WikiText: a stand-alone . ! or ? token (not "@.@", "..." or "U.S.")
LANGUAGE = "en"  # sentencex's rules for untokenized text


@dataclass
class TokenizedChunk:
    """A chunk of documents as token ids: sentence s is ids[start[s]:start[s] + length[s]], the sentences of
    document d are [doc_bounds[d], doc_bounds[d + 1]) (documents without text left out)."""

    ids: np.ndarray
    start: np.ndarray
    length: np.ndarray
    doc_bounds: np.ndarray

    def __post_init__(self):
        self.end = self.start + self.length  # sentence ends, increasing: sentences are contiguous

    @property
    def num_docs(self) -> int:
        return len(self.doc_bounds) - 1


def split_sentences(lines: pa.Array, tokenized: bool) -> pa.ListArray:
    """Each line's sentences."""
    if tokenized:
        return pc.split_pattern(pc.replace_substring_regex(lines, TOKENIZED_SENTENCE_END, "\\1\n"), "\n")
    return pa.array(
        [list(sentencex.segment(LANGUAGE, line)) for line in lines.to_pylist()], type=pa.list_(pa.large_string())
    )


def chunk_sentences(texts: list[str], vocab: Vocab, wikitext: bool, tokenized: bool) -> TokenizedChunk:
    """Documents -> sentences as token-id ranges; empty sentences and headings dropped."""
    docs = pa.array(texts, type=pa.large_string())
    lines = pc.split_pattern(docs, "\n")
    line_doc = pc.list_parent_indices(lines).to_numpy()
    lines = pc.list_flatten(lines)
    keep = pc.invert(pc.match_substring_regex(lines, HEADING))
    lines, line_doc = pc.filter(lines, keep), line_doc[keep.to_numpy(zero_copy_only=False)]
    if wikitext and vocab.special_tokens["unk"] != D2L_SPECIAL_TOKENS["unk"]:
        lines = pc.replace_substring(lines, D2L_SPECIAL_TOKENS["unk"], vocab.special_tokens["unk"])
    sentences = split_sentences(lines, tokenized)
    sentence_doc = line_doc[pc.list_parent_indices(sentences).to_numpy()]
    words = pc.utf8_split_whitespace(pc.list_flatten(sentences))
    ids, tokens_per_word = vocab.encode_words(pc.list_flatten(words))
    word_offsets = words.offsets.to_numpy().astype(np.int64) - words.offsets[0].as_py()
    token_offsets = (
        word_offsets if tokens_per_word is None else np.concatenate([[0], np.cumsum(tokens_per_word)])[word_offsets]
    )
    start, length = token_offsets[:-1], np.diff(token_offsets)
    nonempty = length > 0
    doc = sentence_doc[nonempty]
    return TokenizedChunk(ids, start[nonempty], length[nonempty], np.flatnonzero(np.diff(doc, prepend=-1, append=-1)))


class DocumentPool:
    """The documents random B segments come from: those of ``chunks``, numbered across them."""

    def __init__(self, chunks: list[TokenizedChunk]):
        self.chunks = chunks
        self.first_doc = np.cumsum([0] + [c.num_docs for c in chunks]).tolist()

    def random_segment(self, rng: random.Random, own_doc: int, target: int) -> tuple[int, int, int]:
        """(chunk, start, length) of the sentences from a random sentence of a random other document on, until
        ``target`` tokens or the document's end (at least one sentence), as Google's random next segment."""
        doc = rng.randrange(self.first_doc[-1] - 1)
        doc += doc >= own_doc
        c = bisect.bisect_right(self.first_doc, doc) - 1
        chunk, local = self.chunks[c], doc - self.first_doc[c]
        first, end = int(chunk.doc_bounds[local]), int(chunk.doc_bounds[local + 1])
        j = rng.randrange(first, end)
        b_start = int(chunk.start[j])
        last = min(int(np.searchsorted(chunk.end, b_start + target, side="left")), end - 1)
        return c, b_start, int(chunk.end[max(last, j)]) - b_start


def create_pairs(
    pool: DocumentPool, current: int, config: ExampleConfig, rng: random.Random
) -> list[tuple[int, int, int, int, int, int]]:
    """Google's ``create_instances_from_document`` (ALBERT's for SOP) over every document of chunk ``current``
    of the pool. Returns (a_start, a_len, b_chunk, b_start, b_len, label) tuples; A is in chunk ``current``."""
    max_tokens = config.max_len - 3
    chunk = pool.chunks[current]
    starts, lengths, bounds = chunk.start.tolist(), chunk.length.tolist(), chunk.doc_bounds.tolist()
    sop = config.sentence_task == "sop"
    can_draw = pool.first_doc[-1] >= 2  # another document to take a random segment from
    pairs = []
    for d in range(chunk.num_docs):
        first, end = bounds[d], bounds[d + 1]
        target = rng.randint(2, max_tokens) if rng.random() < config.short_seq_prob else max_tokens
        chunk_start, chunk_len, i = first, 0, first
        while i < end:
            chunk_len += lengths[i]
            if i == end - 1 or chunk_len >= target:
                count = i - chunk_start + 1
                a_end = rng.randint(1, count - 1) if count >= 2 else 1
                a_start = starts[chunk_start]
                a_len = starts[chunk_start + a_end - 1] + lengths[chunk_start + a_end - 1] - a_start
                b_start = starts[chunk_start + a_end] if count >= 2 else 0
                b_len = starts[i] + lengths[i] - b_start
                if count == 1 or (not sop and rng.random() < 0.5):
                    if can_draw:
                        b_chunk, b_start, b_len = pool.random_segment(rng, pool.first_doc[current] + d, target - a_len)
                        pairs.append((a_start, a_len, b_chunk, b_start, b_len, 1 if sop else 0))
                    i -= count - a_end  # the sentences not used for A go back to the document
                elif sop and rng.random() < 0.5:
                    pairs.append((b_start, b_len, current, a_start, a_len, 1))  # swapped
                else:
                    pairs.append((a_start, a_len, current, b_start, b_len, 0 if sop else 1))
                chunk_start, chunk_len = i + 1, 0
            i += 1
    return pairs


def gather_pairs(pool: DocumentPool, current: int, found: list[tuple]) -> tuple[np.ndarray, PairRanges]:
    """The pairs as ranges into one id array: chunk ``current``'s ids, then copies of the B segments taken from
    other chunks."""
    table = np.asarray(found, dtype=np.int64).reshape(-1, 6)
    b_chunk, b_start, b_len = table[:, 2], table[:, 3].copy(), table[:, 4]
    pieces, offset = [pool.chunks[current].ids], len(pool.chunks[current].ids)
    for c in np.unique(b_chunk[b_chunk != current]).tolist():
        rows = np.flatnonzero(b_chunk == c)
        lengths = b_len[rows]
        pieces.append(pool.chunks[c].ids[np.repeat(b_start[rows], lengths) + segment_arange(lengths)])
        b_start[rows] = offset + np.cumsum(lengths) - lengths
        offset += int(lengths.sum())
    ids = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    return ids, PairRanges(table[:, 0], table[:, 1], b_start, b_len, table[:, 5].astype(np.int8))


def bert_examples(
    pool: DocumentPool, current: int, vocab: Vocab, config: ExampleConfig, chunk_index: int
) -> dict[str, np.ndarray]:
    """The examples of chunk ``current`` of the pool (``chunk_index`` of the corpus), ``dupe_factor`` times with
    different pairs and masks. Randomness comes from (seed, chunk index, copy), so the same chunk with the same
    pool gives the same examples whether the corpus was read whole or streamed."""
    columns: list[dict[str, np.ndarray]] = []
    for copy in range(config.dupe_factor):
        rng = random.Random(f"bertds-{config.seed}-{chunk_index}-{copy}")
        ids, pairs = gather_pairs(pool, current, create_pairs(pool, current, config, rng))
        generator = np.random.default_rng([config.seed, chunk_index, copy, 1])
        cut_a, cut_b = truncate_longest_first(pairs.a_len, pairs.b_len, config.max_len - 3, ties_cut_a=False)
        pairs.a_start += generator.binomial(cut_a, 0.5)  # each cut token comes off the front or the back
        pairs.b_start += generator.binomial(cut_b, 0.5)
        pairs.a_len, pairs.b_len = pairs.a_len - cut_a, pairs.b_len - cut_b
        columns.append(finish_examples(ids, pairs, vocab, config, [config.seed, chunk_index, copy, 2]))
    return {k: np.concatenate([c[k] for c in columns]) for k in columns[0]}
