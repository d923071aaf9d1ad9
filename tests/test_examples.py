"""Packing pairs into examples (bertds/data/examples.py): special tokens, segments, shortest max_len."""

import numpy as np
import pytest

from bertds.data import (
    DataConfig,
    ExampleConfig,
    build_examples,
    resolve_corpus,
)
from bertds.errors import UserError
from tests.conftest import as_numpy


def test_special_tokens_and_segment_ids_are_exact(prepared):
    d = as_numpy(prepared.examples)
    vocab = prepared.vocab
    tokens, segments, valid = d["tokens"], d["segments"], d["valid_len"]
    assert (valid <= 64).all() and tokens.shape[1] == 64
    assert (tokens[:, 0] == vocab.cls_id).all()
    rows = np.arange(len(tokens))
    assert (tokens[rows, valid - 1] == vocab.sep_id).all()
    # Segment 0 covers <cls> A <sep>, segment 1 covers B <sep>, padding is segment 0 and <pad>.
    len_a = (segments == 0).argmin(axis=1) - 2
    assert (tokens[rows, len_a + 1] == vocab.sep_id).all()
    positions = np.arange(64)
    expected_segments = (positions >= len_a[:, None] + 2) & (positions < valid[:, None])
    assert (segments == expected_segments).all()
    assert ((tokens == vocab.pad_id) == (positions >= valid[:, None])).all()
    # Exactly two <sep> and one <cls> per pair (mask replacement never writes special tokens).
    assert ((tokens == vocab.sep_id).sum(axis=1) == 2).all() and ((tokens == vocab.cls_id).sum(axis=1) == 1).all()


@pytest.mark.parametrize("recipe", ["d2l", "bert"])
def test_max_len_4_is_refused_and_5_keeps_a_token_in_each_segment(tmp_path, recipe):
    # 20 blank-line separated documents (the bert recipe's random next segments come from other documents)
    documents = [
        "\n".join(" . ".join(f"p{d}{i} s{j} w{d} w{j}" for j in range(5)) for i in range(2)) for d in range(20)
    ]
    (tmp_path / "documents.txt").write_text("\n\n".join(documents) + "\n")
    source = resolve_corpus([str(tmp_path / "documents.txt")])
    with pytest.raises(UserError, match="--max-len 4: must be in 5..512"):
        DataConfig(max_len=4, truncate=True)
    with pytest.raises(UserError, match="max_len must be in 5..512"):
        build_examples(source, ExampleConfig(max_len=4, truncate=True, recipe=recipe), min_freq=1)
    examples, _ = build_examples(source, ExampleConfig(max_len=5, truncate=True, recipe=recipe), min_freq=1)
    d = as_numpy(examples)
    len_a = (d["segments"] == 0).argmin(axis=1) - 2  # <cls> A <sep> is segment 0, B <sep> segment 1
    len_b = d["valid_len"] - len_a - 3
    assert len(examples) >= 100 and (len_a >= 1).all() and (len_b >= 1).all() and (d["valid_len"] == 5).all()
