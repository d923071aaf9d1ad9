"""The d2l recipe (bertds/data/d2l.py): paragraph and word splits, NSP pairs, prediction counts."""

import pytest

from bertds.data import (
    ExampleConfig,
    build_examples,
    resolve_corpus,
)
from bertds.data.d2l import paragraph_sentences
from bertds.errors import UserError
from tests.conftest import as_numpy, restore_masked, write_corpus


def test_mlm_selection_is_15_percent_of_the_sequence_as_d2l(prepared):
    # d2l: num_mlm_preds = max(1, round(len(tokens) * 0.15)), len(tokens) counting <cls> and both <sep>
    d = as_numpy(prepared.examples)
    slots = d["mlm_weights"].shape[1]
    expected = [min(max(1, round(n * 0.15)), slots, n - 3) for n in d["valid_len"].tolist()]
    assert d["mlm_weights"].sum(axis=1).astype(int).tolist() == expected


def test_nsp_labels_are_balanced(prepared):
    assert abs(as_numpy(prepared.examples)["nsp_label"].mean() - 0.5) < 0.02


def test_sentence_and_word_split_is_pythons(tmp_path):
    """The byte-level split equals d2l's line.strip().lower().split(" . ") and sentence.split(), also on lines
    with other whitespace, overlapping separators, separators at the ends and empty sentences."""
    import pyarrow as pa

    from bertds.data.d2l import d2l_paragraphs

    lines = [
        "a . b",
        " . x . y . ",
        "a . . b",
        "a . . . b",
        "x  .  y",
        "x .  . y",
        "x\t.\ty . z",
        "",
        "   ",
        "one",
        ". . .",
        "a .",
        ". a",
        "a . b\r",
        "Caf\u00e9\u00a0Au . Lait\u3000x",
        "q\x1cr . s\x01t . u\u2028v",
        "x . \u2003 . y",
        "\u0085a . b\u0085",
        "The Crane . the crane . THE",
        "a.b . c. . .d",
        "z . \t. w",
    ] * 3
    for array in (pa.array(lines, pa.large_string()), pa.array(["skip"] + lines, pa.string()).slice(1)):
        corpus = d2l_paragraphs(array)
        expected = [[s.split() for s in line.strip().lower().split(" . ")] for line in lines]
        assert corpus.paragraph_size.tolist() == [len(p) for p in expected]
        assert corpus.sentence_words.tolist() == [len(s) for p in expected for s in p]
        assert [corpus.dictionary[int(i)].as_py() for i in corpus.word_index] == [
            w for p in expected for s in p for w in s
        ]
        kept = [len(line.split(" . ")) >= 2 for line in lines]  # d2l tests the raw line
        assert corpus.is_paragraph.tolist() == kept
        counts = {}
        for w in (w for p, keep in zip(expected, kept) if keep for s in p for w in s):
            counts[w] = counts.get(w, 0) + 1
        assert corpus.word_counts() == counts


def synthetic_corpus(tmp_path, paragraphs=40, sentences=5):
    # Sentence j of paragraph i is "pI sJ wI wJ" - its identity can be read back from the tokens.
    lines = [" . ".join(f"p{i} s{j} w{i} w{j}" for j in range(sentences)) for i in range(paragraphs)]
    return write_corpus(tmp_path / "corpus", [" = Title = ", ""] + lines)


def decode_pairs(examples, vocab):
    d = as_numpy(examples)
    len_a = (d["segments"] == 0).argmin(axis=1) - 2
    tokens = restore_masked(d)
    pairs = []
    for row, n_a, n in zip(tokens, len_a, d["valid_len"]):
        words = [vocab.tokenizer.id_to_token(int(t)) for t in row[:n]]
        pairs.append((words[1 : 1 + n_a], words[2 + n_a : n - 1]))
    return pairs, d["nsp_label"]


def test_true_next_pairs_are_adjacent_sentences_of_one_paragraph(tmp_path):
    examples, vocab = build_examples(
        resolve_corpus(None, str(synthetic_corpus(tmp_path))), ExampleConfig(max_len=16), min_freq=1
    )
    pairs, labels = decode_pairs(examples, vocab)
    assert len(pairs) == 40 * 4  # every adjacent pair of every paragraph, none too long
    for (a, b), is_next in zip(pairs, labels):
        if is_next:
            assert a[0] == b[0] and int(b[1][1:]) == int(a[1][1:]) + 1
    assert 0.3 < labels.mean() < 0.7


def test_over_long_pairs_are_dropped_or_truncated(tmp_path):
    source = resolve_corpus(None, str(synthetic_corpus(tmp_path)))
    with pytest.raises(UserError, match="raise --max-len or pass --truncate"):  # 4 + 4 + 3 = 11 > 10
        build_examples(source, ExampleConfig(max_len=10), min_freq=1)
    truncated, vocab = build_examples(source, ExampleConfig(max_len=10, truncate=True), min_freq=1)
    d = as_numpy(truncated)
    assert len(truncated) == 160 and (d["valid_len"] == 10).all()
    pairs, _ = decode_pairs(truncated, vocab)
    assert all(len(a) + len(b) == 7 and abs(len(a) - len(b)) <= 1 for a, b in pairs)


def test_corpus_without_two_sentence_paragraphs_is_a_user_error(tmp_path):
    source = resolve_corpus(None, str(write_corpus(tmp_path, [" = Title = ", "one sentence only", ""])))
    with pytest.raises(UserError, match="no paragraph with two or more sentences"):
        paragraph_sentences(source)
    with pytest.raises(UserError, match="no paragraph with two or more sentences"):
        build_examples(source, ExampleConfig())


def test_dupe_factor_redraws_the_nsp_pairs_and_masks_of_every_copy(tmp_path):
    """--dupe-factor N: copy 0 is d2l's draw, unchanged; the other copies pair and mask the same sentences anew."""
    source = resolve_corpus(None, str(synthetic_corpus(tmp_path)))
    single, _ = build_examples(source, ExampleConfig(max_len=16), min_freq=1)
    tripled, vocab = build_examples(source, ExampleConfig(max_len=16, dupe_factor=3), min_freq=1)
    one, three = as_numpy(single), as_numpy(tripled)
    assert len(tripled) == 3 * len(single) == 3 * 160
    for name, column in one.items():
        assert (three[name][:160] == column).all(), name
    pairs, labels = decode_pairs(tripled, vocab)
    copies = [pairs[k * 160 : (k + 1) * 160] for k in range(3)]
    assert [a for a, _ in copies[1]] == [a for a, _ in copies[0]]  # every adjacent pair once per copy
    assert [b for _, b in copies[1]] != [b for _, b in copies[0]]  # with other random next sentences
    assert (labels[160:320] != labels[:160]).any()
    assert (three["pred_positions"][160:320] != one["pred_positions"]).any()
    for (a, b), is_next in zip(pairs, labels):
        if is_next:
            assert a[0] == b[0] and int(b[1][1:]) == int(a[1][1:]) + 1
