"""The original-BERT recipe (bertds/data/bert_examples.py): NSP and SOP pairs follow documents."""

import numpy as np
import pytest

from bertds.data import (
    ExampleConfig,
    build_examples,
    resolve_corpus,
)
from tests.conftest import columns, document_corpus, restore_masked


def decode_origins(examples, vocab):
    """Per example: the (doc, sentence) of every token of A and of B, '.' dropped."""
    d = columns(examples)
    tokens = restore_masked(d)
    first_b = np.argmax(d["segments"], axis=1)
    out = []
    for row, b, n in zip(tokens, first_b, d["valid_len"]):
        words = [vocab.tokenizer.id_to_token(int(t)) for t in row[:n]]
        origin = [tuple(map(int, w[1:].split("s"))) if w.startswith("d") else None for w in words]
        out.append(([o for o in origin[1 : b - 1] if o], [o for o in origin[b : n - 1] if o]))
    return out, d


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_bert_pairs_follow_documents(tmp_path, task):
    corpus = resolve_corpus([str(document_corpus(tmp_path, docs=60))])
    config = ExampleConfig(max_len=32, recipe="bert", sentence_task=task, dupe_factor=3)
    examples, vocab = build_examples(corpus, config, min_freq=1)
    pairs, d = decode_origins(examples, vocab)
    labels = d["nsp_label"]
    assert (d["valid_len"] <= 32).all() and d["tokens"].shape == (len(examples), 32)
    assert d["valid_len"].mean() > 20  # segments are filled towards max_len, not single sentences
    assert ((d["mlm_weights"] > 0).sum(axis=1) <= config.max_predictions).all()
    same_docs = np.asarray([a[0][0] == b[0][0] for a, b in pairs])
    assert 0.4 < (labels if task == "nsp" else labels[same_docs]).mean() < 0.6 and len(labels) > 200
    for (a, b), label, same_doc in zip(pairs, labels, same_docs):
        assert a == sorted(a) and b == sorted(b) and len({x[0] for x in a}) == 1 and len({x[0] for x in b}) == 1
        if task == "sop":  # ALBERT: 0 = in order, 1 = swapped, or B from another document (a lone segment)
            assert (a[-1][1] < b[0][1] if label == 0 else b[-1][1] < a[0][1]) if same_doc else label == 1
        elif label:  # the continuation (truncation may cut whole sentences at the seam; checked exactly below)
            assert same_doc and a[-1][1] < b[0][1]
        else:
            assert not same_doc
    untruncated = [(a, b, label) for (a, b), label, n in zip(pairs, labels, d["valid_len"]) if n < 32]
    assert all(b[0][1] == a[-1][1] + 1 if label else True for a, b, label in untruncated if task == "nsp")
    assert all(
        (b[0][1] == a[-1][1] + 1) if label == 0 else (a[0][1] == b[-1][1] + 1)
        for a, b, label in untruncated
        if task == "sop" and a[0][0] == b[0][0]
    )
