"""Masking (bertds/data/masking.py): 80/10/10 split, prediction positions, whole words, dynamic masks."""

import numpy as np
import pytest

from bertds.data import (
    ExampleConfig,
    PretrainingBatches,
    TokenizerChoice,
    prepare_directory,
    resolve_corpus,
)
from bertds.data.loader import BatchSource
from bertds.data.masking import special_positions
from tests.conftest import as_numpy, document_corpus, restore_masked


def test_mask_random_keep_split_is_80_10_10(prepared):
    d = as_numpy(prepared.examples)
    real = d["mlm_weights"] > 0
    rows = np.broadcast_to(np.arange(len(real))[:, None], real.shape)
    shown = d["tokens"][rows[real], d["pred_positions"][real]]
    labels = d["mlm_labels"][real]
    masked = shown == prepared.vocab.mask_id
    kept = shown == labels
    randomised = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.02 and abs(kept.mean() - 0.1) < 0.02 and abs(randomised.mean() - 0.1) < 0.02
    assert not np.isin(shown[randomised], prepared.vocab.special_ids).any()


def test_prediction_positions_point_at_real_non_special_tokens(prepared):
    d = as_numpy(prepared.examples)
    real = d["mlm_weights"] > 0
    pos = d["pred_positions"]
    len_a = (d["segments"] == 0).argmin(axis=1) - 2
    assert (pos[real] > 0).all()
    assert (pos[real] < np.broadcast_to(d["valid_len"][:, None] - 1, pos.shape)[real]).all()
    assert (pos[real] != np.broadcast_to(len_a[:, None] + 1, pos.shape)[real]).all()
    assert (real.sum(axis=1) >= 1).all() and (d["mlm_labels"][~real] == 0).all() and (pos[~real] == 0).all()
    assert not np.isin(
        d["mlm_labels"][real], [prepared.vocab.cls_id, prepared.vocab.sep_id, prepared.vocab.pad_id]
    ).any()


def test_bert_masking_counts_and_whole_words(wordpiece, wikitext_dir):
    corpus = resolve_corpus([str(wikitext_dir / "wiki.valid.tokens")])
    config = ExampleConfig(max_len=128, recipe="bert", whole_word_masking=True)
    from bertds.data.prepare import bert_chunks

    d = next(bert_chunks(corpus, wordpiece, config, streaming=False))
    assert config.max_predictions == 20 and ExampleConfig(max_len=512, recipe="bert").max_predictions == 80
    real = d["mlm_weights"] > 0
    expected = np.minimum(20, np.maximum(1, np.round(d["valid_len"] * 0.15)))
    assert (real.sum(axis=1) <= expected).all() and real.sum() > 0.9 * expected.sum()
    tokens = restore_masked(d)
    continuation = wordpiece.continuation_table()[tokens]
    chosen = np.zeros_like(tokens, dtype=bool)
    rows = np.broadcast_to(np.arange(len(tokens))[:, None], real.shape)
    chosen[rows[real], d["pred_positions"][real]] = True
    # A continuation piece is chosen exactly when the piece before it is (whole words only).
    after_text = ~special_positions(d["segments"], d["valid_len"])[:, :-1]  # not a cut word's first piece
    inside = continuation[:, 1:] & after_text
    assert (chosen[:, 1:][inside] == chosen[:, :-1][inside]).all() and inside.sum() > 1000


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamic")
    corpus = resolve_corpus([str(document_corpus(tmp))])
    return prepare_directory(
        corpus,
        TokenizerChoice("word", min_freq=1),
        ExampleConfig(max_len=32, recipe="bert", dynamic_masking=True),
        tmp / "prepared",
    )


def test_dynamic_masks_change_per_epoch_and_repeat_per_seed(dynamic):
    assert "pred_positions" not in dynamic.examples.column_names and dynamic.masking is not None
    n = len(dynamic.examples)
    shard = PretrainingBatches(dynamic.examples, 8, 0, 1).shard
    epoch0 = BatchSource(shard, 0, dynamic.masking, seed=5)[(0, list(range(n)))]
    epoch1 = BatchSource(shard, 0, dynamic.masking, seed=5)[(1, list(range(n)))]
    again = BatchSource(shard, 0, dynamic.masking, seed=5)[(0, list(range(n)))]
    assert (epoch0["pred_positions"] != epoch1["pred_positions"]).any(dim=1).float().mean() > 0.9
    assert all((epoch0[k] == again[k]).all() for k in epoch0)
    weights = epoch0["mlm_weights"]
    assert (weights.sum(dim=1) >= 1).all() and abs(weights.sum() / epoch0["valid_len"].sum() - 0.15) < 0.02
    # A batch of examples masks each example as it would be masked alone: a function of its index only.
    alone = BatchSource(shard, 0, dynamic.masking, seed=5)[(0, [7])]
    assert (alone["tokens"][0] == epoch0["tokens"][7]).all()


def test_dynamic_masking_resumes_exactly(dynamic):
    def stream(state=None):
        batches = PretrainingBatches(dynamic.examples, 16, 0, 1, seed=2, masking=dynamic.masking)
        if state:
            batches.load_state_dict(state)
        return batches, iter(batches)

    reference, it = stream()
    per_epoch = reference.batches_per_epoch
    expected = [next(it) for _ in range(per_epoch + 3)]
    first, it = stream()
    for _ in range(per_epoch + 1):
        next(it)
    _, resumed = stream(first.state_dict())
    for batch in expected[per_epoch + 1 :]:
        got = next(resumed)
        assert all((got[k] == batch[k]).all() for k in batch)
    assert set(expected[0]) == {
        "tokens",
        "segments",
        "valid_len",
        "nsp_label",
        "pred_positions",
        "mlm_labels",
        "mlm_weights",
    }
