"""The prepared-directory format: ``manifest.json`` (recipe, example counts, the size and SHA-256 of every shard, and
a checksum of the manifest itself), ``tokenizer.json`` and ``shards/*.arrow`` (Arrow stream files). Written by
``prepare.py``; read back, verified against the manifest, as memory-mapped ``datasets.Dataset`` rows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from bertds.data.examples import ExampleConfig
from bertds.data.masking import MaskingSpec
from bertds.data.tokenizer import TOKENIZER_FILE, Vocab, describe_vocab
from bertds.errors import UserError
from bertds.fsutil import file_sha256

if TYPE_CHECKING:
    import datasets

FORMAT_VERSION = 5  # bump when the example semantics or the layout change, so stale caches are not reused
MANIFEST = "manifest.json"
SHARDS = "shards"
ROWS_PER_SHARD = 1 << 17


class DamagedData(UserError):
    """A prepared directory whose files are not those its manifest describes (deleted, truncated or edited).
    ``problem`` says what is wrong, without the fix: the cache rebuilds such an entry, a ``--prepared`` or ``--out``
    directory is refused with the fix."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}; delete {path} and prepare the data again (launcher/prepare_data.py)")
        self.path, self.problem = path, problem


@dataclass
class PreparedData:
    examples: datasets.Dataset
    vocab: Vocab
    path: Path
    from_cache: bool  # True: read from a directory prepared before; False: prepared just now
    masking: MaskingSpec | None = None  # set when the collator draws the masks (dynamic masking)
    manifest: dict | None = None


def example_features(config: ExampleConfig) -> datasets.Features:
    import datasets

    seq = datasets.Sequence(datasets.Value("int32"), length=config.max_len)
    features = {
        "tokens": seq,
        "segments": datasets.Sequence(datasets.Value("int8"), length=config.max_len),
        "valid_len": datasets.Value("int32"),
        "nsp_label": datasets.Value("int8"),
    }
    if not config.dynamic_masking:
        preds = datasets.Sequence(datasets.Value("int32"), length=config.max_predictions)
        features.update(
            pred_positions=preds,
            mlm_labels=preds,
            mlm_weights=datasets.Sequence(datasets.Value("float32"), length=config.max_predictions),
        )
    return datasets.Features(features)


def to_table(columns: dict[str, np.ndarray], features: datasets.Features) -> pa.Table:
    arrays = []
    for name in features:
        values = columns[name]
        if values.ndim == 2:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1]))
        else:
            arrays.append(pa.array(values))
    return pa.Table.from_arrays(arrays, schema=features.arrow_schema)


def in_memory_dataset(columns: dict[str, np.ndarray], config: ExampleConfig) -> datasets.Dataset:
    import datasets
    from datasets.fingerprint import generate_random_fingerprint

    # A random fingerprint, as datasets gives in-memory results: its default hashes every byte of the table.
    return datasets.Dataset(
        datasets.table.InMemoryTable(to_table(columns, example_features(config))),
        fingerprint=generate_random_fingerprint(),
    )


def write_shards(directory: Path, prefix: str, columns: dict[str, np.ndarray], config: ExampleConfig) -> int:
    """Writes the rows as Arrow stream files of at most ROWS_PER_SHARD rows; returns the row count."""
    features = example_features(config)
    total = len(columns["tokens"])
    for part, begin in enumerate(range(0, total, ROWS_PER_SHARD)):
        table = to_table({k: v[begin : begin + ROWS_PER_SHARD] for k, v in columns.items()}, features)
        with (
            pa.OSFile(str(directory / f"{prefix}-{part:03d}.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table)
    return total


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(directory: Path, vocab: Vocab, fields: dict) -> int:
    """Writes the tokenizer and the manifest (``fields`` plus the shards' rows, sizes and checksums) of a directory
    whose shards are complete; returns the number of examples."""
    files = sorted((directory / SHARDS).glob("*.arrow"))
    counts = {f.name: pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows for f in files}
    vocab.save(directory)
    manifest = {
        "version": FORMAT_VERSION,
        **fields,
        "num_examples": sum(counts.values()),
        "shards": counts,
        "shard_bytes": {f.name: f.stat().st_size for f in files},
        "shard_sha256": {f.name: file_sha256(f) for f in files},
        "tokenizer_info": describe_vocab(vocab),
        "vocab_size": len(vocab),
    }
    manifest["checksum"] = manifest_checksum(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest["num_examples"]


MANIFEST_KEYS = ("num_examples", "shards", "shard_bytes", "shard_sha256", "tokenizer_info", "max_len", "masking")


def read_manifest(path: Path) -> dict:
    """The manifest of a prepared directory, refused when it is missing, unreadable, of another format version or
    edited after preparation."""
    if not (path / MANIFEST).is_file():
        raise UserError(
            f"{path} is not a prepared data directory (no {MANIFEST}); write one with launcher/prepare_data.py"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DamagedData(path, f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path} was prepared by another bertds version (format "
            f"{manifest.get('version') if isinstance(manifest, dict) else None}, now {FORMAT_VERSION}); "
            "prepare it again"
        )
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise DamagedData(path, f"{MANIFEST} was changed after preparation (its checksum differs)")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DamagedData(path, f"{MANIFEST} lacks {', '.join(missing)}")
    return manifest


def verify_shard(path: Path, name: str, manifest: dict) -> None:
    """The shard ``name`` exists with the size and SHA-256 the manifest records."""
    shard = path / SHARDS / name
    if not shard.is_file():
        raise DamagedData(path, f"shard {SHARDS}/{name} is missing")
    size, expected = shard.stat().st_size, manifest["shard_bytes"].get(name)
    if size != expected:
        raise DamagedData(
            path,
            f"shard {SHARDS}/{name} has {size} bytes, not the {expected} it was written with (truncated or replaced)",
        )
    if file_sha256(shard) != manifest["shard_sha256"].get(name):
        raise DamagedData(path, f"shard {SHARDS}/{name} does not match its SHA-256 checksum (corrupt)")


def check_shape(path: Path, examples: datasets.Dataset, manifest: dict) -> None:
    """The rows are those the manifest describes: its example count and max_len (the shards' real shape)."""
    width = examples.features["tokens"].length
    if len(examples) != manifest["num_examples"] or width != manifest["max_len"]:
        raise DamagedData(
            path,
            f"the shards hold {len(examples)} examples of {width} tokens, the manifest says "
            f"{manifest['num_examples']} of {manifest['max_len']}",
        )


def load_vocab(path: Path, manifest: dict) -> Vocab:
    """The directory's tokenizer, which must be the one its examples were made with."""
    if not (path / TOKENIZER_FILE).is_file():
        raise DamagedData(path, f"{TOKENIZER_FILE} is missing")
    try:
        vocab = Vocab.load(path)
    except Exception as e:
        raise DamagedData(path, f"{TOKENIZER_FILE} cannot be read ({str(e).splitlines()[0][:120]})") from None
    if vocab.fingerprint() != manifest["tokenizer_info"].get("fingerprint"):
        raise DamagedData(path, f"{TOKENIZER_FILE} is not the tokenizer its examples were made with")
    return vocab


def load_prepared(path: str | Path, from_cache: bool = True) -> PreparedData:
    """Memory-maps a prepared directory's shards, after checking every file against the manifest."""
    import datasets

    path = Path(path)
    manifest = read_manifest(path)
    for name in manifest["shards"]:
        verify_shard(path, name, manifest)
    vocab = load_vocab(path, manifest)
    shards = [datasets.Dataset.from_file(str(path / SHARDS / name)) for name in manifest["shards"]]
    examples = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    check_shape(path, examples, manifest)
    config_fields = {k: manifest[k] for k in ExampleConfig.__dataclass_fields__ if k in manifest}
    masking = ExampleConfig(**config_fields).masking(vocab) if manifest["masking"] == "dynamic" else None
    return PreparedData(examples, vocab, path, from_cache, masking, manifest)
