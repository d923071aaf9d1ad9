"""The data pipeline at scale: tokenizers, original-BERT examples, masking, corpora and streaming, rank shards,
prepared directories and bad input."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.distributed import split_dataset_by_node

from bertds.data import (
    DataConfig,
    ExampleConfig,
    PretrainingBatches,
    TokenizerChoice,
    Vocab,
    build_examples,
    prepare_directory,
    prepare_for_training,
    resolve_corpus,
)
from bertds.data.loader import BatchSource, rank_range, table_columns
from bertds.data.masking import special_positions
from bertds.data.prepare import corpus_texts
from bertds.data.shards import in_memory_dataset
from bertds.errors import UserError
from tests.conftest import REPO, restore_masked

REPO_LAUNCHER = REPO / "launcher" / "prepare_data.py"


def columns(examples):
    return table_columns(examples.data.table)


# --- tokenizers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wordpiece(wikitext_dir):
    corpus = resolve_corpus([str(wikitext_dir / "wiki.train.tokens")])
    return Vocab.train_wordpiece(corpus_texts(corpus, "[UNK]"), vocab_size=8000)


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


# --- original-BERT example creation ------------------------------------------------------------------------------


def document_corpus(tmp_path, docs=30, sentences=12, name="docs.txt"):
    """Blank-line separated documents; every word of sentence s of document d is "dDsS", so any token tells
    where it came from. Sentence lengths vary from 2 to 6 words."""
    rng = np.random.default_rng(0)
    blocks = []
    for d in range(docs):
        said = [" ".join([f"d{d}s{s}"] * int(rng.integers(2, 7))) + " ." for s in range(sentences)]
        blocks.append("\n".join(" ".join(said[i : i + 3]) for i in range(0, sentences, 3)))
    path = tmp_path / name
    path.write_text("\n\n".join(blocks) + "\n")
    return path


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


# --- dynamic masking, rank shards ----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_are_disjoint_and_complete(world_size):
    n = 100
    examples = in_memory_dataset(
        {
            "tokens": np.arange(n * 4, dtype=np.int32).reshape(n, 4),
            "segments": np.zeros((n, 4), np.int8),
            "valid_len": np.full(n, 4, np.int32),
            "nsp_label": np.zeros(n, np.int8),
        },
        ExampleConfig(max_len=4, dynamic_masking=True),
    )
    seen = []
    for rank in range(world_size):
        batches = PretrainingBatches(examples, 5, rank, world_size, seed=3)
        ids = columns(batches.shard)["tokens"][:, 0] // 4
        assert ids.tolist() == list(rank_range(n, rank, world_size))
        seen += ids.tolist()
        stream = iter(batches)
        epochs = [
            [int(i) for _ in range(batches.batches_per_epoch) for i in next(stream)["tokens"][:, 0] // 4]
            for _ in range(2)
        ]
        assert epochs[0] != epochs[1] and set(epochs[0]) <= set(ids.tolist())  # reshuffled per epoch
        replay = iter(PretrainingBatches(examples, 5, rank, world_size, seed=3))
        replayed = [int(i) for _ in range(batches.batches_per_epoch) for i in next(replay)["tokens"][:, 0] // 4]
        assert replayed == epochs[0]
    assert sorted(seen) == list(range(n))  # every example on exactly one rank


# --- corpora, streaming ------------------------------------------------------------------------------------------


def test_streaming_and_whole_reading_give_the_same_examples(tmp_path):
    files = [document_corpus(tmp_path, docs=12, name=f"part{i}.txt") for i in range(2)]
    rows = [{"text": t} for t in ["first doc . it has two sentences .", "second one . also two ."] * 5]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "extra.parquet")
    corpus = resolve_corpus([str(f) for f in files] + [str(tmp_path / "extra.jsonl"), str(tmp_path / "extra.parquet")])
    config = ExampleConfig(max_len=24, recipe="bert", seed=1)
    whole, _ = build_examples(corpus, config, min_freq=1)
    streamed, _ = build_examples(corpus, config, min_freq=1, streaming=True)
    a, b = columns(whole), columns(streamed)
    assert len(whole) > 100 and all(np.array_equal(a[k], b[k]) for k in a)
    # Each rank streams a disjoint part of the documents; together they are all of them.
    documents = [r["text"] for r in corpus.documents(streaming=False)]
    parts = [
        [r["text"] for r in split_dataset_by_node(corpus.documents(streaming=True), rank=r, world_size=3)]
        for r in range(3)
    ]
    assert sorted(sum(parts, [])) == sorted(documents) and len(documents) == 12 * 2 + 20


def test_wikitext_documents_are_title_sections_and_hub_matches_local(wikitext_dir, monkeypatch):
    local = resolve_corpus([str(wikitext_dir / "wiki.valid.tokens")])
    documents = [r["text"] for r in local.documents()]
    assert all(doc.startswith("= ") and not doc.startswith("= =") for doc in documents) and len(documents) > 50
    lines = (wikitext_dir / "wiki.valid.tokens").read_text().splitlines(keepends=True)
    hub_rows = [{"text": "" if not line.strip() else line} for line in lines]
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(hub_rows))
    hub = resolve_corpus(["hub:Salesforce/wikitext:wikitext-2-v1"], split="validation")
    assert hub.wikitext and [r["text"] for r in hub.documents(streaming=True)] == documents


def test_wikitext_names_resolve_to_local_files_or_the_hub(wikitext_dir, monkeypatch):
    monkeypatch.delenv("BERTDS_DATA_DIR", raising=False)
    assert resolve_corpus(["wikitext-103"]).hub == ("Salesforce/wikitext", "wikitext-103-v1")
    assert resolve_corpus(["wikitext-2-raw"]).hub == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert resolve_corpus(["wikitext-2"], str(wikitext_dir), "validation").files == (
        wikitext_dir / "wiki.valid.tokens",
    )
    with pytest.raises(UserError, match="wiki.train.raw is missing"):
        resolve_corpus(["wikitext-2-raw"], str(wikitext_dir))


# --- prepared directories, bad input -----------------------------------------------------------------------------


def test_prepared_directory_serves_training_and_refuses_another_tokenizer(tmp_path, wordpiece):
    path = tmp_path / "prepared"
    corpus = resolve_corpus([str(document_corpus(tmp_path))])
    data = prepare_directory(
        corpus, TokenizerChoice("word", min_freq=1), ExampleConfig(max_len=32, recipe="bert"), path
    )
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["num_examples"] == len(data.examples) == sum(manifest["shards"].values())
    assert manifest["max_len"] == 32 and manifest["tokenizer_info"]["fingerprint"] == data.vocab.fingerprint()
    again = prepare_for_training(DataConfig(prepared=str(path), max_len=32), rank=0)
    assert again.vocab.fingerprint() == data.vocab.fingerprint() and len(again.examples) == len(data.examples)
    wordpiece.save(tmp_path)
    with pytest.raises(UserError, match="another tokenizer"):
        prepare_for_training(
            DataConfig(prepared=str(path), max_len=32, tokenizer=str(tmp_path / "tokenizer.json")), rank=0
        )
    with pytest.raises(UserError, match="max_len 32"):
        prepare_for_training(DataConfig(prepared=str(path), max_len=64), rank=0)


def test_training_prepares_a_raw_corpus_into_the_cache(tmp_path):
    config = DataConfig(
        corpus=[str(document_corpus(tmp_path))],
        cache_dir=str(tmp_path / "cache"),
        max_len=32,
        recipe="bert",
        min_freq=1,
        masking="dynamic",
    )
    first = prepare_for_training(config, rank=0)
    second = prepare_for_training(config, rank=0)
    assert first.path == second.path and second.from_cache and second.masking == first.masking


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, prepare_cli, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    single = tmp_path / "single.tokens"
    single.write_text(" = Title = \n\n one sentence only \n")
    bad_tokenizer = tmp_path / "weights.bin"
    bad_tokenizer.write_bytes(b"\0")
    cases = {
        "empty": ["--corpus", str(empty)],
        "missing": ["--corpus", str(tmp_path / "nowhere.txt")],
        "single": ["--corpus", str(single)],
        "tokenizer": ["--corpus", str(document_corpus(tmp_path)), "--tokenizer", str(bad_tokenizer)],
        "no examples": ["--corpus", str(single), "--recipe", "bert", "--sentence-task", "sop"],
    }
    for name, args in cases.items():
        out = tmp_path / "out" / name
        assert prepare_cli([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), name
    result = subprocess.run(
        [sys.executable, str(REPO_LAUNCHER), "--corpus", str(empty), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "are empty" in result.stderr and not (tmp_path / "x").exists()
