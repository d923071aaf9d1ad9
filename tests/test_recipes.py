"""The recipes held to their reference code on small crafted corpora: d2l's paragraphs and random-sentence pool,
Google's sentences, random next documents and whole-word masking, ALBERT's sentence order, and the --split names."""
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bertds.data import CorpusSource, ExampleConfig, build_examples, resolve_corpus
from bertds.data.loader import table_columns
from bertds.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write_tokens(directory: Path, lines: list[str]) -> Path:
    """A WikiText-style file: each line as WikiText writes it, " text \\n"."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wiki.train.tokens").write_text("".join(f" {line} \n" for line in lines))
    return directory


def read_pairs(columns: dict, vocab) -> list[tuple[list[str], list[str], int]]:
    """(A, B, label) of every example, the masked positions restored."""
    tokens = columns["tokens"].copy()
    rows = np.broadcast_to(np.arange(len(tokens))[:, None], columns["pred_positions"].shape)
    real = columns["mlm_weights"] > 0
    tokens[rows[real], columns["pred_positions"][real]] = columns["mlm_labels"][real]
    pairs = []
    for row, segments, n, label in zip(tokens, columns["segments"], columns["valid_len"], columns["nsp_label"]):
        words = [vocab.tokenizer.id_to_token(int(t)) for t in row[:n]]
        first_b = int(np.argmax(segments))
        pairs.append((words[1:first_b - 1], words[first_b:n - 1], int(label)))
    return pairs


# --- d2l: paragraphs are tested on the raw line ------------------------------------------------------------------

def test_d2l_one_sentence_paragraphs_are_counted_and_drawn_but_have_no_pair(tmp_path):
    # 30 two-sentence paragraphs, and 5 one-sentence lines ending in " . " (d2l keeps those: the raw line
    # " solo ... . \n" splits in two on ' . '); a line without " . " is no paragraph.
    lines = [f"p{i} a{i % 3} . p{i} b{i % 3} ." for i in range(30)] + ["solo word ."] * 5 + ["skipped line"] * 9
    directory = write_tokens(tmp_path / "d2l", lines)
    examples, vocab = build_examples(CorpusSource.resolve(directory), ExampleConfig(max_len=16), min_freq=5)
    assert vocab.tokenizer.token_to_id("solo") is not None  # 5 occurrences, all in one-sentence paragraphs
    assert vocab.tokenizer.token_to_id("skipped") is None  # 9 occurrences outside paragraphs
    pairs = read_pairs(table_columns(examples.data.table), vocab)
    assert len(pairs) == 30  # one pair per two-sentence paragraph, none of a one-sentence paragraph's own
    assert all(a[0] != "solo" for a, _, _ in pairs)

    many = write_tokens(tmp_path / "pool", lines[:30] * 40 + ["solo word ."] * 1200)
    examples, vocab = build_examples(CorpusSource.resolve(many), ExampleConfig(max_len=16), min_freq=1)
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

@pytest.fixture(scope="module")
def prepare_cli():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "launcher" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_split_valid_is_validation_and_an_unknown_split_is_one_error_line(tmp_path, wikitext_dir, prepare_cli,
                                                                          capsys):
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
        CorpusSource.resolve(wikitext_dir).file("dev")
