"""Vocabularies (bertds/data/tokenizer.py): d2l word level, WordPiece, loading and saving."""

import pyarrow as pa
import pytest

from bertds.data import (
    Vocab,
)
from bertds.errors import UserError


def test_word_vocabulary_follows_d2l(prepared):
    vocab = prepared.vocab
    assert [vocab.unk_id, vocab.pad_id, vocab.mask_id, vocab.cls_id, vocab.sep_id] == [0, 1, 2, 3, 4]
    assert vocab.tokenizer.id_to_token(5) == "the"  # most frequent word first
    assert vocab.encode(["The Crane qqqzzz"]) == [[5, vocab.tokenizer.token_to_id("crane"), vocab.unk_id]]


def test_vocab_round_trips_through_disk(prepared, tmp_path):
    prepared.vocab.save(tmp_path)
    assert Vocab.load(tmp_path).fingerprint() == prepared.vocab.fingerprint()
    with pytest.raises(UserError, match="no tokenizer.json"):
        Vocab.load(tmp_path / "missing")


def test_wordpiece_has_the_asked_size_and_berts_special_ids(wordpiece):
    assert len(wordpiece) == 8000
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id) == (
        0,
        100,
        101,
        102,
        103,
    )
    assert wordpiece.first_regular_id == 104
    assert wordpiece.tokenizer.id_to_token(101) == "[CLS]"


def test_wordpiece_round_trips_wikitext(wordpiece, wikitext_dir):
    lines = [
        line.strip()
        for line in (wikitext_dir / "wiki.valid.tokens").read_text().splitlines()
        if line.strip() and "<unk>" not in line
    ][:2000]
    encodings = wordpiece.tokenizer.encode_batch(lines, add_special_tokens=False)
    known = [(line, e.ids) for line, e in zip(lines, encodings) if wordpiece.unk_id not in e.ids]
    assert len(known) >= 0.95 * len(lines)
    for line, ids in known:  # every character comes back, in order (the decoder re-spaces punctuation)
        assert "".join(wordpiece.tokenizer.decode(ids).split()) == "".join(line.lower().split())


def test_distinct_word_encoding_equals_the_tokenizer(wordpiece, wikitext_dir):
    lines = [line.strip() for line in (wikitext_dir / "wiki.valid.tokens").read_text().splitlines() if line.strip()][
        :300
    ]
    words = pa.array([w for line in lines for w in line.split()])
    for vocab in (wordpiece, Vocab.train_word_level(lines, min_freq=2)):
        ids, per_word = vocab.encode_words(words)
        assert ids.tolist() == [i for e in vocab.encode(lines) for i in e]
        if per_word is not None:
            assert per_word.sum() == len(ids)


def test_vocab_txt_gives_the_same_tokens_and_a_bad_file_is_refused(wordpiece, tmp_path):
    by_id = sorted(wordpiece.tokenizer.get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in by_id))
    loaded = Vocab.from_file(tmp_path / "vocab.txt")
    text = ["The crane flew over the river Thames in 1862 ."]
    assert loaded.encode(text) == wordpiece.encode(text) and loaded.cls_id == 101
    (tmp_path / "bad.txt").write_text("a\nb\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "model.bin").write_bytes(b"\0\1")
    for bad in ("bad.txt", "bad.json", "model.bin", "missing.txt"):
        with pytest.raises(UserError, match="vocab.txt|tokenizer.json"):
            Vocab.from_file(tmp_path / bad)
    from tokenizers import Tokenizer, models, pre_tokenizers

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()  # its words keep their spaces: not word-by-word
    byte_level.save(str(tmp_path / "gpt2.json"))
    with pytest.raises(UserError, match="splits on whitespace"):
        Vocab.from_file(tmp_path / "gpt2.json")


def test_saved_tokenizers_load_back_with_their_special_tokens(wordpiece, tmp_path):
    wordpiece.save(tmp_path)
    assert Vocab.load(tmp_path).special_tokens["cls"] == "[CLS]"
    assert Vocab.load(tmp_path).fingerprint() == wordpiece.fingerprint()
