import numpy as np
import pytest

from bertds.data import (
    DataConfig,
    ExampleConfig,
    PretrainingBatches,
    Vocab,
    build_examples,
    prepare_pretraining_data,
    resolve_corpus,
)
from bertds.data.corpus import HUB_DATASET
from bertds.data.d2l import paragraph_sentences
from bertds.data.loader import table_columns
from bertds.errors import UserError
from tests.conftest import restore_masked


def as_numpy(examples):
    return {k: np.asarray(v) for k, v in examples.with_format("numpy")[:].items()}


def write_corpus(directory, lines, split_file="wiki.train.tokens"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / split_file).write_text("".join(f" {line} \n" for line in lines))
    return directory


# --- the real WikiText-2 ---------------------------------------------------------------------------------------


def test_mlm_selection_is_15_percent_of_the_sequence_as_d2l(prepared):
    # d2l: num_mlm_preds = max(1, round(len(tokens) * 0.15)), len(tokens) counting <cls> and both <sep>
    d = as_numpy(prepared.examples)
    slots = d["mlm_weights"].shape[1]
    expected = [min(max(1, round(n * 0.15)), slots, n - 3) for n in d["valid_len"].tolist()]
    assert d["mlm_weights"].sum(axis=1).astype(int).tolist() == expected


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


def test_nsp_labels_are_balanced(prepared):
    assert abs(as_numpy(prepared.examples)["nsp_label"].mean() - 0.5) < 0.02


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


def test_word_vocabulary_follows_d2l(prepared):
    vocab = prepared.vocab
    assert [vocab.unk_id, vocab.pad_id, vocab.mask_id, vocab.cls_id, vocab.sep_id] == [0, 1, 2, 3, 4]
    assert vocab.tokenizer.id_to_token(5) == "the"  # most frequent word first
    assert vocab.encode(["The Crane qqqzzz"]) == [[5, vocab.tokenizer.token_to_id("crane"), vocab.unk_id]]


def test_same_seed_gives_same_examples_and_another_seed_differs(wikitext_dir):
    source = resolve_corpus(None, str(wikitext_dir), "validation")
    first, _ = build_examples(source, ExampleConfig(seed=3))
    second, _ = build_examples(source, ExampleConfig(seed=3))
    other, _ = build_examples(source, ExampleConfig(seed=4))
    a, b, c = as_numpy(first), as_numpy(second), as_numpy(other)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(a["tokens"]) != len(c["tokens"]) or not np.array_equal(a["tokens"], c["tokens"])


def test_second_prepare_reads_the_cache(prepared, wikitext_dir, cache_dir):
    corpus = resolve_corpus(None, str(wikitext_dir))
    again = prepare_pretraining_data(corpus, ExampleConfig(max_len=64, seed=0), cache_dir)
    assert again.from_cache and again.path == prepared.path
    assert len(again.examples) == len(prepared.examples)
    assert np.array_equal(as_numpy(again.examples)["tokens"], as_numpy(prepared.examples)["tokens"])
    assert again.vocab.fingerprint() == prepared.vocab.fingerprint()


def test_hub_and_local_directory_give_the_same_paragraphs(wikitext_dir, monkeypatch):
    import datasets

    lines = (wikitext_dir / "wiki.valid.tokens").read_text().splitlines(keepends=True)
    # The hub's wikitext rows: each line with its trailing newline, empty lines as "".
    hub_rows = datasets.Dataset.from_dict({"text": ["" if not line.strip() else line for line in lines]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub_rows)
    monkeypatch.delenv("BERTDS_DATA_DIR", raising=False)
    from_hub = paragraph_sentences(resolve_corpus(None, None, "validation"))
    local = paragraph_sentences(resolve_corpus(None, str(wikitext_dir), "validation"))
    assert from_hub == local and len(local) > 1000


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


# --- a small synthetic corpus, to check pair semantics exactly ---------------------------------------------------


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


# --- rank shards ----------------------------------------------------------------------------------------------


def test_rank_shards_are_disjoint_and_cover_the_data(prepared):
    seen = []
    for rank in range(2):
        shard = PretrainingBatches(prepared.examples, 64, rank, 2).shard
        seen.append(set(map(tuple, table_columns(shard.data.table)["tokens"].tolist())))
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == len(set(map(tuple, as_numpy(prepared.examples)["tokens"].tolist())))


def test_batches_are_fixed_size_and_reshuffled_each_epoch(prepared):
    small = prepared.examples.select(range(100))
    batches = iter(PretrainingBatches(small, 32, 0, 1, seed=1))
    epoch0 = [next(batches) for _ in range(3)]
    epoch1 = [next(batches) for _ in range(3)]
    assert all(b["tokens"].shape == (32, 64) for b in epoch0 + epoch1)
    assert not all((x["tokens"] == y["tokens"]).all() for x, y in zip(epoch0, epoch1))
    replay = iter(PretrainingBatches(small, 32, 0, 1, seed=1))
    assert all((next(replay)["tokens"] == b["tokens"]).all() for b in epoch0)


# --- bad input -----------------------------------------------------------------------------------------------


def test_missing_data_dir_names_the_flag(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass --data-dir"):
        resolve_corpus(None, str(tmp_path / "nowhere"))


def test_missing_and_empty_files_are_user_errors(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text("")
    with pytest.raises(UserError, match="is empty"):
        resolve_corpus(None, str(tmp_path), "train")
    with pytest.raises(UserError, match="wiki.valid.tokens is missing"):
        resolve_corpus(None, str(tmp_path), "validation")


def test_corpus_without_two_sentence_paragraphs_is_a_user_error(tmp_path):
    source = resolve_corpus(None, str(write_corpus(tmp_path, [" = Title = ", "one sentence only", ""])))
    with pytest.raises(UserError, match="no paragraph with two or more sentences"):
        paragraph_sentences(source)
    with pytest.raises(UserError, match="no paragraph with two or more sentences"):
        build_examples(source, ExampleConfig())


def test_data_dir_from_environment(tmp_path, monkeypatch, wikitext_dir):
    monkeypatch.setenv("BERTDS_DATA_DIR", str(wikitext_dir))
    assert resolve_corpus(None).files == (wikitext_dir.resolve() / "wiki.train.tokens",)
    monkeypatch.delenv("BERTDS_DATA_DIR")
    assert resolve_corpus(None).hub == HUB_DATASET  # the hub


def test_interrupted_cache_build_is_not_used(wikitext_dir, tmp_path):
    source = resolve_corpus(None, str(write_corpus(tmp_path / "c", ["a b . c d . e f", "g h . i j"] * 50)))
    config = ExampleConfig(max_len=16)
    built = prepare_pretraining_data(source, config, tmp_path / "cache")
    (built.path / "manifest.json").unlink()  # as if the process died before the build completed
    rebuilt = prepare_pretraining_data(source, config, tmp_path / "cache")
    assert not rebuilt.from_cache and (rebuilt.path / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_vocab_round_trips_through_disk(prepared, tmp_path):
    prepared.vocab.save(tmp_path)
    assert Vocab.load(tmp_path).fingerprint() == prepared.vocab.fingerprint()
    with pytest.raises(UserError, match="no tokenizer.json"):
        Vocab.load(tmp_path / "missing")


def test_batch_position_round_trips_for_resume(prepared):
    small = prepared.examples.select(range(100))
    reference = iter(PretrainingBatches(small, 32, 0, 1, seed=2))
    expected = [next(reference)["tokens"] for _ in range(7)]  # crosses two epoch boundaries (3 batches each)
    first = PretrainingBatches(small, 32, 0, 1, seed=2)
    stream = iter(first)
    for _ in range(4):
        next(stream)
    assert first.state_dict() == {"epoch": 1, "batches_done": 1}
    resumed = PretrainingBatches(small, 32, 0, 1, seed=2)
    resumed.load_state_dict(first.state_dict())
    stream = iter(resumed)
    assert all((next(stream)["tokens"] == t).all() for t in expected[4:])
