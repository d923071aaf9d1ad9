"""Preparing data (bertds/data/prepare.py, shards.py): examples repeat per seed, the cache is reused, streaming
equals whole reading, prepared directories serve training, bad command lines exit 2; and when files are damaged
(issue 13 §5, §6, §8): a ``--prepared`` or ``--out`` directory is refused with one error line and left as it is, a
cache entry is prepared again; stale preparation directories of dead processes go, those of live ones stay."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.distributed import split_dataset_by_node

from bertds.data import (
    DataConfig,
    ExampleConfig,
    TokenizerChoice,
    build_examples,
    load_prepared,
    prepare_directory,
    prepare_for_training,
    prepare_pretraining_data,
    resolve_corpus,
)
from bertds.data.prepare import preparation_dir
from bertds.data.shards import MANIFEST, SHARDS, manifest_checksum
from bertds.errors import EXIT_USER_ERROR, UserError, run_cli
from tests.conftest import (
    REPO,
    as_numpy,
    columns,
    document_corpus,
    launcher_command,
    launcher_env,
    write_corpus,
)

TRAIN = ("--max-steps", "1", "--batch-size", "8", "--no-wandb")


def files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def only_shard(directory: Path) -> Path:
    shards = sorted((directory / SHARDS).glob("*.arrow"))
    assert len(shards) == 1
    return shards[0]


def damage(directory: Path, how: str) -> Path:
    """Deletes, truncates or flips a byte of the (only) shard; returns it."""
    shard = only_shard(directory)
    data = shard.read_bytes()
    if how == "deleted":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:  # corrupt, same size
        shard.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    return shard


def edit_manifest(directory: Path, reseal: bool, **changes) -> None:
    """Changes manifest fields; ``reseal``: also its own checksum, as a careful editor would."""
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    if reseal:
        manifest["checksum"] = manifest_checksum(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def prepared_copy(prepared, tmp_path) -> Path:
    """A copy of the session's prepared WikiText-2 examples (max_len 64), to damage."""
    return Path(shutil.copytree(prepared.path, tmp_path / "prepared"))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """Blank-line separated documents of WikiText-style paragraphs: quick to prepare."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    documents = [
        "\n".join(" . ".join(" ".join(rng.choice(words, rng.integers(2, 8))) for _ in range(4)) for _ in range(3))
        for _ in range(40)
    ]
    path = tmp_path_factory.mktemp("small-corpus") / "corpus.txt"
    path.write_text("\n\n".join(documents) + "\n")
    return path


# --- --prepared: refused, one line, nothing deleted (§5, §6) -------------------------------------------------------


@pytest.mark.parametrize(
    "flags, refusal",
    [
        ({"mask_prob": 0.3}, "was prepared with mask_prob 0.15, not --mask-prob 0.3"),
        ({"masking": "dynamic"}, "was prepared with dynamic_masking False, not --masking dynamic"),
        ({"recipe": "bert"}, "was prepared with recipe d2l, not --recipe bert"),
        ({"mask_prob": 0.15, "sentence_task": "none"}, None),  # the directory's own values (none trains on nsp)
    ],
)
def test_a_prepared_directory_refuses_flags_asking_for_other_examples(prepared_copy, flags, refusal):
    config = DataConfig(prepared=str(prepared_copy), max_len=64, **flags)
    if refusal is None:
        assert len(prepare_for_training(config, rank=0).examples) > 0
        return
    with pytest.raises(UserError) as refused:
        prepare_for_training(config, rank=0)
    assert str(refused.value) == (f"--prepared {prepared_copy} {refusal}; drop the flag or prepare the data with it")


@pytest.mark.parametrize("how", ["deleted", "truncated", "corrupt"])
def test_a_damaged_prepared_shard_is_one_error_naming_it_and_nothing_is_deleted(prepared_copy, how, capsys):
    size = only_shard(prepared_copy).stat().st_size
    shard = damage(prepared_copy, how)
    before = files(prepared_copy)
    config = DataConfig(prepared=str(prepared_copy), max_len=64)
    assert run_cli(lambda: prepare_for_training(config, rank=0)) == EXIT_USER_ERROR
    problem = {
        "deleted": "is missing",
        "truncated": f"has {size // 2} bytes, not the {size} it was written with (truncated or replaced)",
        "corrupt": "does not match its SHA-256 checksum (corrupt)",
    }[how]
    assert capsys.readouterr().err.splitlines() == [
        f"error: {prepared_copy}: shard {SHARDS}/{shard.name} {problem}; delete {prepared_copy} and prepare the data "
        "again (launcher/prepare_data.py)"
    ]
    assert files(prepared_copy) == before


@pytest.mark.parametrize(
    "edit, problem",
    [
        ("max_len", "manifest.json was changed after preparation (its checksum differs)"),
        ("max_len resealed", "the shards hold {n} examples of 64 tokens, the manifest says {n} of 128"),
        ("shard checksum resealed", "shard shards/{shard} does not match its SHA-256 checksum (corrupt)"),
        ("tokenizer", "tokenizer.json is not the tokenizer its examples were made with"),
    ],
)
def test_an_edited_prepared_directory_is_refused(prepared_copy, prepared, edit, problem):
    shard = only_shard(prepared_copy).name
    if edit.startswith("max_len"):
        edit_manifest(prepared_copy, reseal="resealed" in edit, max_len=128)
    elif edit.startswith("shard checksum"):
        edit_manifest(prepared_copy, reseal=True, shard_sha256={shard: "0" * 64})
    else:  # another run's tokenizer in place of the examples' own
        (prepared_copy / "tokenizer.json").write_text(
            (prepared_copy / "tokenizer.json").read_text().replace('"the"', '"thee"', 1)
        )
    with pytest.raises(UserError) as refused:
        load_prepared(prepared_copy)
    assert str(refused.value) == (
        f"{prepared_copy}: {problem.format(n=len(prepared.examples), shard=shard)}; "
        f"delete {prepared_copy} and prepare the data again (launcher/prepare_data.py)"
    )


def test_training_on_a_damaged_prepared_directory_exits_2_with_one_line(prepared_copy, cache_dir, tmp_path):
    shard = damage(prepared_copy, "truncated")
    before = files(prepared_copy)
    result = subprocess.run(
        launcher_command(
            "pretrain.py", "--prepared", str(prepared_copy), "--output-dir", str(tmp_path / "run"), *TRAIN
        ),
        cwd=REPO,
        env=launcher_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"shard {SHARDS}/{shard.name} has" in errors[0] and "Traceback" not in result.stderr
    assert files(prepared_copy) == before


# --- the cache: a damaged entry is prepared again, never trusted (§5) ---------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "truncated", "corrupt", "tokenizer"])
def test_a_damaged_cache_entry_is_prepared_again_with_a_warning(small_corpus, tmp_path, how, capsys):
    corpus, config = resolve_corpus([str(small_corpus)]), ExampleConfig(max_len=24)
    first = prepare_pretraining_data(corpus, config, tmp_path, min_freq=1)
    expected = np.asarray(first.examples.with_format("numpy")["tokens"])
    if how == "tokenizer":
        (first.path / "tokenizer.json").write_text("{not json")
        problem = "tokenizer.json cannot be read"
    else:
        problem = f"shard {SHARDS}/{damage(first.path, how).name} "
    capsys.readouterr()
    again = prepare_pretraining_data(corpus, config, tmp_path, min_freq=1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: cache entry {first.path} is damaged ({problem}")
    assert err[0].endswith("); preparing it again")
    assert again.path == first.path and not again.from_cache
    assert np.array_equal(np.asarray(again.examples.with_format("numpy")["tokens"]), expected)
    assert prepare_pretraining_data(corpus, config, tmp_path, min_freq=1).from_cache  # intact again


def test_training_reuses_an_intact_cache_entry_and_rebuilds_a_damaged_one(small_corpus, tmp_path):
    """The run's data line says "cached at" only when the examples came from the cache (§8), and a damaged entry
    is prepared again, after which the run trains (§5)."""
    cache = tmp_path / "cache"
    flags = ("--corpus", str(small_corpus), "--min-freq", "1", "--cache-dir", str(cache))
    entry = prepare_for_training(DataConfig(corpus=[str(small_corpus)], min_freq=1, cache_dir=str(cache)), 0).path

    def train(name: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            launcher_command("pretrain.py", *flags, "--output-dir", str(tmp_path / name), *TRAIN),
            cwd=REPO,
            env=launcher_env(cache),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    intact = train("intact")
    assert f"cached at {entry}\n" in intact.stdout and "prepared at" not in intact.stdout
    shard = damage(entry, "truncated")
    rebuilt = train("rebuilt")
    assert f"prepared at {entry}\n" in rebuilt.stdout and "cached at" not in rebuilt.stdout
    warnings = [line for line in rebuilt.stderr.splitlines() if line.startswith("warning: cache entry")]
    assert len(warnings) == 1 and f"shard {SHARDS}/{shard.name} has" in warnings[0]
    assert (tmp_path / "rebuilt" / "model.pt").is_file() and load_prepared(entry).from_cache


# --- stale preparation directories (§8) -----------------------------------------------------------------------


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process.pid
    process.kill()
    process.wait()


def test_stale_preparation_directories_of_dead_processes_are_removed(small_corpus, tmp_path, dead_pid, live_pid):
    host = socket.gethostname()
    cache = tmp_path / "cache"
    dead = preparation_dir(cache / "other-entry", f"{host}-{dead_pid}")
    live = preparation_dir(cache / "other-entry", f"{host}-{live_pid}")
    elsewhere = preparation_dir(cache / "other-entry", f"another-host-{dead_pid}")  # not checkable from here
    older = preparation_dir(cache / "older-entry", str(dead_pid))  # an older version's NAME.tmp-PID
    for directory in (dead, live, elsewhere, older):
        (directory / SHARDS).mkdir(parents=True)
    prepare_pretraining_data(resolve_corpus([str(small_corpus)]), ExampleConfig(max_len=24), cache, min_freq=1)
    assert not dead.exists() and not older.exists() and live.is_dir() and elsewhere.is_dir()
    assert not [p for p in cache.iterdir() if p not in (live, elsewhere) and ".tmp-" in p.name]


# --- launcher/prepare_data.py --out (§5, consistent with --prepared) -----------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_reusing_a_damaged_out_directory_is_one_error_and_deletes_nothing(
    prepare_cli, small_corpus, tmp_path, how, capsys
):
    out = tmp_path / "out"
    args = [
        "--corpus",
        str(small_corpus),
        "--min-freq",
        "1",
        "--max-len",
        "24",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert prepare_cli(args) == 0
    assert capsys.readouterr().out.startswith("prepared ")
    assert prepare_cli(args) == 0
    assert capsys.readouterr().out.startswith("reused ")
    shard = damage(out, how)
    before = files(out)
    assert prepare_cli(args) == EXIT_USER_ERROR
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: shard {SHARDS}/{shard.name} ")
    assert err[0].endswith("prepare the data again (launcher/prepare_data.py)") and files(out) == before


@pytest.mark.parametrize("existing", ["a file", "a directory that is not prepared data"])
def test_an_out_that_holds_something_else_is_refused_untouched(prepare_cli, small_corpus, tmp_path, existing, capsys):
    out = tmp_path / "out"
    if existing == "a file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = files(tmp_path)
    assert (
        prepare_cli(
            [
                "--corpus",
                str(small_corpus),
                "--min-freq",
                "1",
                "--out",
                str(out),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == EXIT_USER_ERROR
    )
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {out} is {existing}; nothing was written there: choose a new directory to write the prepared data to"
    ]
    assert {k: v for k, v in files(tmp_path).items() if not k.startswith("cache")} == before


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


def test_interrupted_cache_build_is_not_used(wikitext_dir, tmp_path):
    source = resolve_corpus(None, str(write_corpus(tmp_path / "c", ["a b . c d . e f", "g h . i j"] * 50)))
    config = ExampleConfig(max_len=16)
    built = prepare_pretraining_data(source, config, tmp_path / "cache")
    (built.path / "manifest.json").unlink()  # as if the process died before the build completed
    rebuilt = prepare_pretraining_data(source, config, tmp_path / "cache")
    assert not rebuilt.from_cache and (rebuilt.path / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


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


REPO_LAUNCHER = REPO / "launcher" / "prepare_data.py"


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
    documents = str(document_corpus(tmp_path))
    cases = {
        "empty": ["--corpus", str(empty)],
        "missing": ["--corpus", str(tmp_path / "nowhere.txt")],
        "single": ["--corpus", str(single)],
        "tokenizer": ["--corpus", documents, "--tokenizer", str(bad_tokenizer)],
        "no examples": ["--corpus", str(single), "--recipe", "bert", "--sentence-task", "sop"],
        "dupe factor with dynamic masks": ["--corpus", documents, "--masking", "dynamic", "--dupe-factor", "2"],
        "d2l with sop": ["--corpus", documents, "--sentence-task", "sop"],
    }
    for name, args in cases.items():
        out = tmp_path / "out" / name
        assert prepare_cli([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (name, err)
        if name == "dupe factor with dynamic masks":
            assert "use it with --masking static" in err[0]
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), name
    result = subprocess.run(
        [sys.executable, str(REPO_LAUNCHER), "--corpus", str(empty), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "are empty" in result.stderr and not (tmp_path / "x").exists()
