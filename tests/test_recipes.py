"""The recipes held to their reference code on small crafted corpora: d2l's paragraphs and random-sentence pool,
Google's sentences, random next documents and whole-word masking, ALBERT's sentence order, and the --split names."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bertds.data import ExampleConfig, build_examples, resolve_corpus
from bertds.data.loader import table_columns
from bertds.errors import UserError
from tests.conftest import restore_masked


def write_tokens(directory: Path, lines: list[str]) -> Path:
    """A WikiText-style file: each line as WikiText writes it, " text \\n"."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wiki.train.tokens").write_text("".join(f" {line} \n" for line in lines))
    return directory


def read_pairs(columns: dict, vocab) -> list[tuple[list[str], list[str], int]]:
    """(A, B, label) of every example, the masked positions restored."""
    tokens = restore_masked(columns)
    pairs = []
    for row, segments, n, label in zip(tokens, columns["segments"], columns["valid_len"], columns["nsp_label"]):
        words = [vocab.tokenizer.id_to_token(int(t)) for t in row[:n]]
        first_b = int(np.argmax(segments))
        pairs.append((words[1 : first_b - 1], words[first_b : n - 1], int(label)))
    return pairs


# --- d2l: paragraphs are tested on the raw line ------------------------------------------------------------------


def test_d2l_one_sentence_paragraphs_are_counted_and_drawn_but_have_no_pair(tmp_path):
    # 30 two-sentence paragraphs, and 5 one-sentence lines ending in " . " (d2l keeps those: the raw line
    # " solo ... . \n" splits in two on ' . '); a line without " . " is no paragraph.
    lines = [f"p{i} a{i % 3} . p{i} b{i % 3} ." for i in range(30)] + ["solo word ."] * 5 + ["skipped line"] * 9
    directory = write_tokens(tmp_path / "d2l", lines)
    examples, vocab = build_examples(resolve_corpus(None, str(directory)), ExampleConfig(max_len=16), min_freq=5)
    assert vocab.tokenizer.token_to_id("solo") is not None  # 5 occurrences, all in one-sentence paragraphs
    assert vocab.tokenizer.token_to_id("skipped") is None  # 9 occurrences outside paragraphs
    pairs = read_pairs(table_columns(examples.data.table), vocab)
    assert len(pairs) == 30  # one pair per two-sentence paragraph, none of a one-sentence paragraph's own
    assert all(a[0] != "solo" for a, _, _ in pairs)

    many = write_tokens(tmp_path / "pool", lines[:30] * 40 + ["solo word ."] * 1200)
    examples, vocab = build_examples(resolve_corpus(None, str(many)), ExampleConfig(max_len=16), min_freq=1)
    negatives = [b for _, b, label in read_pairs(table_columns(examples.data.table), vocab) if label == 0]
    share = np.mean([b == ["solo", "word", "."] for b in negatives])
    assert 0.4 < share < 0.6  # 1200 of the 2400 paragraphs: uniform over paragraphs, as random.choice


def test_d2l_vocabulary_on_wikitext2_train_equals_d2ls_rule(prepared, wikitext_dir):
    # d2l's _read_wiki and Vocab(min_freq=5, reserved_tokens=[...]), written out (CI does not install d2l).
    with open(wikitext_dir / "wiki.train.tokens") as f:
        paragraphs = [line.strip().lower().split(" . ") for line in f.readlines() if len(line.split(" . ")) >= 2]
    counts = Counter(word for paragraph in paragraphs for sentence in paragraph for word in sentence.split())
    expected = {"<unk>", "<pad>", "<mask>", "<cls>", "<sep>"} | {w for w, n in counts.items() if n >= 5}
    assert set(prepared.vocab.tokenizer.get_vocab()) == expected
    assert len(prepared.vocab) == len(expected) == 20256


# --- --split ---------------------------------------------------------------------------------------------------


def test_split_valid_is_validation_and_an_unknown_split_is_one_error_line(tmp_path, wikitext_dir, prepare_cli, capsys):
    assert resolve_corpus(None, str(wikitext_dir), "valid").files[0].name == "wiki.valid.tokens"
    assert resolve_corpus(["wikitext-2"], str(wikitext_dir), "valid").split == "validation"
    args = ["--data-dir", str(wikitext_dir), "--cache-dir", str(tmp_path / "cache")]
    assert prepare_cli([*args, "--split", "valid", "--out", str(tmp_path / "valid")]) == 0
    assert "wiki.valid.tokens" in capsys.readouterr().out
    assert prepare_cli([*args, "--split", "dev", "--out", str(tmp_path / "dev")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --split dev") and "train, validation" in err[0]
    assert not (tmp_path / "dev").exists()
    with pytest.raises(UserError, match="unknown split"):
        resolve_corpus(None, str(wikitext_dir), "dev")


# --- Google: sentences ------------------------------------------------------------------------------------------

ABBREVIATED = [
    "The U.S. Army reached St. Louis on Jan. 5, 1862.",
    "Gen. J. E. B. Stuart led the cavalry north.",
    "He lived at No. 10 Downing St. for years.",
    "Wait... what happened next?",
    "Dr. Smith met Prof. Brown at 3 p.m. on Monday.",
    "J. R. R. Tolkien wrote it in 1937!",
]


def test_raw_text_is_split_into_sentences_not_at_abbreviations_initials_or_ellipses():
    import pyarrow as pa

    from bertds.data.bert_examples import split_sentences

    got = split_sentences(pa.array([" ".join(ABBREVIATED), "One more. And another one."]), tokenized=False)
    assert [[s.strip() for s in line] for line in got.to_pylist()] == [ABBREVIATED, ["One more.", "And another one."]]


def test_wikitext_sentences_end_only_at_stand_alone_tokens():
    import pyarrow as pa

    from bertds.data.bert_examples import split_sentences

    line = "The U.S. Army lost 1 @.@ 5 million ... men . Why ? It rained ! The end ."
    got = split_sentences(pa.array([line]), tokenized=True).to_pylist()[0]
    assert [s.strip() for s in got] == [
        "The U.S. Army lost 1 @.@ 5 million ... men .",
        "Why ?",
        "It rained !",
        "The end .",
    ]


# --- Google: random next segments come from the whole corpus -------------------------------------------------------


def topic_corpus(directory: Path, docs: int, single: tuple[int, ...] = ()) -> Path:
    """WikiText-style documents in topic order; every word of document d is "dD". Documents in ``single`` have one
    sentence, the others three."""
    lines = []
    for d in range(docs):
        sentences = 1 if d in single else 3
        lines += [f"= Doc {d} =", "", " ".join([f"d{d} d{d} d{d} ."] * sentences), ""]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wiki.train.tokens").write_text("".join(f" {line} \n" for line in lines))
    return directory / "wiki.train.tokens"


def pair_documents(examples, vocab) -> list[tuple[int, int, int]]:
    """(document of A, document of B, label) per example."""

    def doc(words):
        return int(next(w for w in words if w.startswith("d"))[1:])

    return [(doc(a), doc(b), label) for a, b, label in read_pairs(table_columns(examples.data.table), vocab)]


@pytest.mark.parametrize("streaming", [False, True])
def test_random_next_segments_of_a_topic_ordered_corpus_come_from_all_chunks(tmp_path, streaming):
    from bertds.data.prepare import DOCUMENTS_PER_CHUNK

    docs = 3 * DOCUMENTS_PER_CHUNK  # three chunks, each its own topic
    corpus = resolve_corpus([str(topic_corpus(tmp_path, docs))])
    examples, vocab = build_examples(corpus, ExampleConfig(max_len=32, recipe="bert"), min_freq=1, streaming=streaming)
    found = pair_documents(examples, vocab)
    random_pairs = [(a, b) for a, b, label in found if label == 0]
    assert all(a == b for a, b, label in found if label == 1) and all(a != b for a, b in random_pairs)
    other_chunk = np.mean([a // DOCUMENTS_PER_CHUNK != b // DOCUMENTS_PER_CHUNK for a, b in random_pairs])
    assert 0.55 < other_chunk < 0.78  # uniform over the other documents: 2/3 of them lie in other chunks


def test_streaming_window_holds_the_chunks_within_reach():
    from bertds.data.prepare import document_windows

    windows = list(document_windows(iter(range(10)), reach=2))
    assert [k for _, _, k in windows] == list(range(10))
    assert all(
        window == list(range(max(0, k - 2), min(10, k + 3))) and window[position] == k
        for window, position, k in windows
    )
    assert all(window == list(range(10)) for window, _, _ in document_windows(range(10), reach=None))


# --- Google: whole-word masking skips a word that does not fit ----------------------------------------------------


def test_whole_word_masking_skips_a_word_that_does_not_fit_and_tries_the_next():
    from bertds.data.masking import MaskingSpec, Uniforms, mask_tokens

    class Fixed(Uniforms):
        bits = 24

        def __init__(self, keys):
            self.keys = keys

        def draw(self, stream, shape):
            return self.keys.copy() if stream == 0 else np.zeros(shape)

    continuation = np.zeros(30, dtype=bool)
    continuation[20:] = True  # ids 20-29 are "##" pieces
    # <cls> A(5 ##20) B(6 ##21) C(7) 8 8 8 8 <sep> 9 * 8 <sep>: valid_len 20, so 3 predictions (round(20 * 0.15)).
    tokens = np.asarray([[1, 5, 20, 6, 21, 7, 8, 8, 8, 8, 2] + [9] * 8 + [2]])
    segments = (np.arange(20) >= 11)[None, :].astype(np.int8)
    keys = np.full((1, 20), 0.9)
    keys[0, [1, 3, 5]] = [0.1, 0.2, 0.3]  # word order: A (2 pieces), B (2: does not fit after A), C (1)
    spec = MaskingSpec(
        max_predictions=4, mask_id=3, first_random_id=5, vocab_size=30, whole_word=True, continuation=continuation
    )
    out = mask_tokens(tokens, segments, np.asarray([20]), spec, Fixed(keys))
    assert out["pred_positions"][0].tolist() == [1, 2, 5, 0] and out["mlm_weights"][0].tolist() == [1, 1, 1, 0]


# --- ALBERT: sentence order ---------------------------------------------------------------------------------------


def test_sop_single_segment_document_takes_b_from_another_document_labelled_1(tmp_path):
    corpus = resolve_corpus([str(topic_corpus(tmp_path, 40, single=(0, 7, 21)))])
    examples, vocab = build_examples(corpus, ExampleConfig(max_len=32, recipe="bert", sentence_task="sop"), min_freq=1)
    found = pair_documents(examples, vocab)
    lone = [(a, b, label) for a, b, label in found if a in (0, 7, 21)]
    assert len(lone) == 3 and all(b != a and label == 1 for a, b, label in lone)
    assert all(label == 1 for a, b, label in found if a != b)  # also a lone segment cut by a short target


def test_sop_labels_are_0_in_order_and_1_swapped(tmp_path):
    lines = []
    for d in range(30):  # sentence s of document d: "dD sS"
        lines += [f"= Doc {d} =", "", " ".join(f"d{d} s{s} ." for s in range(4)), ""]
    directory = tmp_path / "sop"
    directory.mkdir()
    (directory / "wiki.train.tokens").write_text("".join(f" {line} \n" for line in lines))
    examples, vocab = build_examples(
        resolve_corpus([str(directory / "wiki.train.tokens")]),
        ExampleConfig(max_len=32, recipe="bert", sentence_task="sop", seed=3),
        min_freq=1,
    )
    labels = []
    for a, b, label in read_pairs(table_columns(examples.data.table), vocab):
        first_a, first_b = int(a[1][1:]), int(b[1][1:])
        assert label == (0 if first_a < first_b else 1)
        labels.append(label)
    assert 0 < np.mean(labels) < 1
