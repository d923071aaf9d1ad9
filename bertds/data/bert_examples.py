"""Original-BERT pretraining examples (Google's ``create_pretraining_data.py``), for one chunk of documents.

Per document: segments (sentences) are gathered until ``target_seq_length`` tokens (``max_len - 3``, or with
probability ``short_seq_prob`` a random shorter length, drawn once per document as Google does), then cut at a
random sentence boundary into A and B. For NSP, B is the true continuation or (probability 0.5, and always when
the chunk holds a single sentence) the start of a random segment of another document of the same chunk of
documents; the unused sentences go back to the document. For SOP (ALBERT) B is always the continuation and the
two are swapped with probability 0.5 (label 0). Pairs are cut longest-first, a token at a time from the front or
the back at random, to ``max_len - 3``.

Sentences of a document are contiguous in the chunk's flat id array, so A and B are (start, length) ranges; the
loop below runs once per sentence, never per token.
"""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertds.data.examples import ExampleConfig, PairRanges, finish_examples, truncate_longest_first
from bertds.data.tokenizer import D2L_SPECIAL_TOKENS, Vocab

HEADING = r"^\s*=.*=\s*$"  # WikiText titles and section headings are not text
SENTENCE_END = r"([.!?]) +"  # a sentence ends at . ! or ? followed by a space (WikiText: " . ")


def chunk_sentences(texts: list[str], vocab: Vocab, wikitext: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                np.ndarray]:
    """Documents -> (flat token ids, sentence start, sentence length, document of each sentence); empty sentences
    and headings dropped."""
    docs = pa.array(texts, type=pa.large_string())
    lines = pc.split_pattern(docs, "\n")
    line_doc = pc.list_parent_indices(lines).to_numpy()
    lines = pc.list_flatten(lines)
    keep = pc.invert(pc.match_substring_regex(lines, HEADING))
    lines, line_doc = pc.filter(lines, keep), line_doc[keep.to_numpy(zero_copy_only=False)]
    if wikitext and vocab.special_tokens["unk"] != D2L_SPECIAL_TOKENS["unk"]:
        lines = pc.replace_substring(lines, D2L_SPECIAL_TOKENS["unk"], vocab.special_tokens["unk"])
    sentences = pc.split_pattern(pc.replace_substring_regex(lines, SENTENCE_END, "\\1\n"), "\n")
    sentence_doc = line_doc[pc.list_parent_indices(sentences).to_numpy()]
    words = pc.utf8_split_whitespace(pc.list_flatten(sentences))
    ids, tokens_per_word = vocab.encode_words(pc.list_flatten(words))
    word_offsets = words.offsets.to_numpy().astype(np.int64) - words.offsets[0].as_py()
    token_offsets = word_offsets if tokens_per_word is None else \
        np.concatenate([[0], np.cumsum(tokens_per_word)])[word_offsets]
    start, length = token_offsets[:-1], np.diff(token_offsets)
    nonempty = length > 0
    return ids, start[nonempty], length[nonempty], sentence_doc[nonempty]


def create_pairs(start: np.ndarray, length: np.ndarray, doc: np.ndarray, config: ExampleConfig,
                 rng: random.Random) -> tuple[list[tuple[int, int, int, int, int]], list[int]]:
    """Google's ``create_instances_from_document`` over every document of the chunk, on sentence ranges.
    Returns (a_start, a_len, b_start, b_len, label) tuples and each pair's document."""
    max_tokens = config.max_len - 3
    doc_bounds = np.flatnonzero(np.diff(doc, prepend=-1, append=-1))  # sentences of doc k: [bounds[k], bounds[k+1])
    num_docs = len(doc_bounds) - 1
    starts, lengths = start.tolist(), length.tolist()
    bounds = doc_bounds.tolist()
    pairs, pair_docs = [], []
    for d in range(num_docs):
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
                if config.sentence_task == "sop":
                    if count >= 2:
                        b_start, b_len = starts[chunk_start + a_end], starts[i] + lengths[i] - starts[
                            chunk_start + a_end]
                        if rng.random() < 0.5:
                            pairs.append((b_start, b_len, a_start, a_len, 0))
                        else:
                            pairs.append((a_start, a_len, b_start, b_len, 1))
                        pair_docs.append(d)
                elif count == 1 or rng.random() < 0.5:
                    if num_docs >= 2:  # a random segment of another document, as long as B's share of target
                        other = rng.randrange(num_docs - 1)
                        other += other >= d
                        j = rng.randrange(bounds[other], bounds[other + 1])
                        b_start = starts[j]
                        while True:  # at least one sentence
                            b_len = starts[j] + lengths[j] - b_start
                            j += 1
                            if j == bounds[other + 1] or b_len >= target - a_len:
                                break
                        pairs.append((a_start, a_len, b_start, b_len, 0))
                        pair_docs.append(d)
                    i -= count - a_end  # the sentences not used for A go back to the document
                else:
                    b_start = starts[chunk_start + a_end]
                    pairs.append((a_start, a_len, b_start, starts[i] + lengths[i] - b_start, 1))
                    pair_docs.append(d)
                chunk_start, chunk_len = i + 1, 0
            i += 1
    return pairs, pair_docs


def bert_examples(texts: list[str], vocab: Vocab, config: ExampleConfig, chunk_index: int,
                  wikitext: bool = False) -> dict[str, np.ndarray]:
    """The examples of one chunk of documents, ``dupe_factor`` times with different pairs and masks. Randomness
    comes from (seed, chunk index, copy), so the same chunk gives the same examples whether it was read whole or
    streamed."""
    ids, start, length, doc = chunk_sentences(texts, vocab, wikitext)
    columns: list[dict[str, np.ndarray]] = []
    for copy in range(config.dupe_factor):
        rng = random.Random(f"bertds-{config.seed}-{chunk_index}-{copy}")
        found, _ = create_pairs(start, length, doc, config, rng)
        table = np.asarray(found, dtype=np.int64).reshape(-1, 5)
        pairs = PairRanges(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4].astype(np.int8))
        generator = np.random.default_rng([config.seed, chunk_index, copy, 1])
        cut_a, cut_b = truncate_longest_first(pairs.a_len, pairs.b_len, config.max_len - 3, ties_cut_a=False)
        pairs.a_start += generator.binomial(cut_a, 0.5)  # each cut token comes off the front or the back
        pairs.b_start += generator.binomial(cut_b, 0.5)
        pairs.a_len, pairs.b_len = pairs.a_len - cut_a, pairs.b_len - cut_b
        columns.append(finish_examples(ids, pairs, vocab, config, [config.seed, chunk_index, copy, 2]))
    return {k: np.concatenate([c[k] for c in columns]) for k in columns[0]}
