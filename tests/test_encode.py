import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from bertds import BertForPreTraining, Vocab, encode, get_config, load_pretrained, save_pretrained
from bertds.encode import TruncatedInput, pack
from bertds.errors import UserError
from tests.conftest import DIST_ENV, REPO, wordpiece_vocab
from tests.pretrained_run import tiny_pretrained_run


@pytest.fixture(scope="module")
def run_dir(launch, wikitext_dir, tmp_path_factory):
    return tiny_pretrained_run(launch, wikitext_dir, tmp_path_factory)


def encode_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return subprocess.run(
        [sys.executable, "-m", "bertds.encode", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def test_crane_depends_on_its_context_and_the_same_input_gives_the_same_vectors(run_dir):
    model, vocab = load_pretrained(run_dir)
    assert vocab.unk_id not in vocab.token_ids(["a", "crane", "is", "flying", "driver", "came"])
    model.train()  # encode switches dropout off by itself, and restores the mode
    flying = encode(model, vocab, "a crane is flying")
    driver = encode(model, vocab, "a crane driver came")
    driver_pair = encode(model, vocab, "a crane driver came", "he just left")
    assert model.training
    assert flying.shape == (1, 6, 128) and driver_pair.shape == (1, 10, 128)
    # The same token at the same position: only the context differs. (A collapsed model, e.g. after a few steps at
    # lr 0.01, differs by ~1e-5.)
    assert relative_difference(flying[0, 2], driver[0, 2]) > 1e-3
    assert relative_difference(driver[0, 2], driver_pair[0, 2]) > 1e-3
    torch.testing.assert_close(encode(model, vocab, "a crane driver came", "he just left"), driver_pair, atol=0, rtol=0)


def test_cli_prints_shape_and_cls_vector_and_all_vectors_as_json(run_dir):
    model, vocab = load_pretrained(run_dir)
    expected = encode(model, vocab, "a crane is flying", "he just left")[0]
    result = encode_cli("--checkpoint", str(run_dir), "a crane is flying", "--pair", "he just left")
    assert result.returncode == 0, result.stderr[-2000:]
    shown = ", ".join(f"{x:.4f}" for x in expected[0, :8].tolist())
    # stdout holds the result only: DeepSpeed's import-time accelerator warning goes to stderr.
    assert result.stdout.splitlines() == [
        "tokens: <cls> a crane is flying <sep> he just left <sep>",
        "shape: (1, 10, 128)",
        f"<cls> vector[:8]: [{shown}, ...]",
    ]
    result = encode_cli("--checkpoint", str(run_dir), "a crane is flying", "--pair", "he just left", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout)  # all of stdout is one JSON document
    assert output["segments"] == [0] * 6 + [1] * 4 and output["shape"] == [1, 10, 128]
    torch.testing.assert_close(torch.tensor(output["vectors"]), expected, atol=1e-6, rtol=0)


def test_cli_reads_a_hugging_face_directory(run_dir, tmp_path):
    pytest.importorskip("transformers")  # the hf extra
    from bertds.export import main as export_main

    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    model, vocab = load_pretrained(run_dir)
    expected = encode(model, vocab, "a crane is flying")[0]
    result = encode_cli("--checkpoint", str(tmp_path / "hf"), "a crane is flying", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout)
    assert output["tokens"] == ["<cls>", "a", "crane", "is", "flying", "<sep>"]
    torch.testing.assert_close(torch.tensor(output["vectors"]), expected, atol=1e-5, rtol=0)


def test_cli_with_a_missing_checkpoint_exits_2(tmp_path):
    result = encode_cli("--checkpoint", str(tmp_path / "none"), "a crane")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {tmp_path / 'none'} does not exist")


def test_wordpiece_vocabulary_encodes_word_pieces():
    vocab = wordpiece_vocab()
    ids, segments = pack(vocab, "Cranes are flying!", "a crane driver")
    assert [vocab.tokenizer.id_to_token(i) for i in ids] == [
        "[CLS]",
        "crane",
        "##s",
        "are",
        "fly",
        "##ing",
        "[UNK]",
        "[SEP]",
        "a",
        "crane",
        "driver",
        "[SEP]",
    ]
    assert segments == [0] * 8 + [1] * 4
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=len(vocab), pad_token_id=vocab.pad_id))
    encoded = encode(model, vocab, "Cranes are flying!", "a crane driver")
    assert encoded.shape == (1, 12, 128)
    assert relative_difference(encoded[0, 1], encoded[0, 9]) > 1e-3  # "crane" in two contexts


def test_cli_on_a_wordpiece_checkpoint(tmp_path):
    vocab = wordpiece_vocab()
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=len(vocab), pad_token_id=vocab.pad_id))
    save_pretrained(model.state_dict(), model.config, vocab, tmp_path)
    result = encode_cli("--checkpoint", str(tmp_path), "Cranes are flying")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[:2] == ["tokens: [CLS] crane ##s are fly ##ing [SEP]", "shape: (1, 7, 128)"]


def short_model(vocab: Vocab, positions: int = 16) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(
        get_config("tiny", vocab_size=len(vocab), pad_token_id=vocab.pad_id, max_position_embeddings=positions)
    )


def test_a_text_longer_than_the_positions_is_truncated_as_hugging_face_does_with_a_warning():
    vocab = wordpiece_vocab()
    model = short_model(vocab)
    with pytest.warns(TruncatedInput, match="the input has 32 tokens with <cls>/<sep>, more than the model's 16 "):
        encoded = encode(model, vocab, " ".join(["crane"] * 30))
    assert encoded.shape == (1, 16, 128)
    # Longest first, from the end, A first on ties: what BertTokenizer(...)(a, b, truncation=True, max_length=16)
    # keeps (A 11 + B 2, and A 6 + B 7 of 10 + 10).
    crane, a, driver = vocab.token_ids(["crane", "a", "driver"])
    for first, second, kept in ((["crane"] * 20, ["a", "driver"], (11, 2)), (["crane"] * 10, ["a"] * 10, (6, 7))):
        with pytest.warns(TruncatedInput):
            ids, segments = pack(vocab, first, second, max_len=16)
        assert ids == [
            vocab.cls_id,
            *[crane] * kept[0],
            vocab.sep_id,
            *vocab.token_ids(second)[: kept[1]],
            vocab.sep_id,
        ]
        assert segments == [0] * (kept[0] + 2) + [1] * (kept[1] + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text that fits: no warning
        assert encode(model, vocab, ["crane"] * 14).shape == (1, 16, 128)
    with pytest.raises(
        UserError,
        match="the input has 17 tokens with <cls>/<sep>, more than the model's 16 "
        "positions; shorten it or pass truncation=True",
    ):
        encode(model, vocab, ["crane"] * 15, truncation=False)


def test_cli_truncates_a_long_text_with_one_warning_line(tmp_path):
    vocab = wordpiece_vocab()
    model = short_model(vocab)
    save_pretrained(model.state_dict(), model.config, vocab, tmp_path)
    result = encode_cli("--checkpoint", str(tmp_path), " ".join(["crane"] * 30), "--pair", "a driver")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith(("warning:", "error:"))] == [
        "warning: the input has 35 tokens with <cls>/<sep>, more than the model's 16 positions; truncated to 16 "
        "(the longer text loses its last tokens first)"
    ]
    assert result.stdout.splitlines()[:2] == [
        f"tokens: [CLS] {' '.join(['crane'] * 11)} [SEP] a driver [SEP]",
        "shape: (1, 16, 128)",
    ]
