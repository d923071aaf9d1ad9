"""Corpora: WikiText-2/103 (tokens or raw, from a local directory or the Hugging Face hub), local ``.txt`` /
``.jsonl`` / ``.parquet`` files or a hub dataset, read as lines (the d2l recipe, split in ``d2l.py``) or as
documents (the original-BERT recipe), whole or streamed.

A document is the text of one article: in WikiText the lines between two ``" = Title = "`` lines, in other text
files the lines between blank lines (Google's BERT input format), in ``.jsonl`` / ``.parquet`` / hub datasets the
``text`` field of one row. Paragraphs inside a document are separated by ``\n``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bertds.errors import UserError

if TYPE_CHECKING:
    import datasets

DATA_DIR_ENV = "BERTDS_DATA_DIR"
WIKITEXT_FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-v1")
SPLIT_ALIASES = {"valid": "validation"}  # WikiText's own file name for the validation split


def wikitext_split(split: str) -> str:
    """``--split`` as a WikiText split name: train, validation (also ``valid``) or test."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in WIKITEXT_FILES:
        raise UserError(f"--split {split}: unknown split; use {', '.join(WIKITEXT_FILES)} (or valid)")
    return split


def wikitext_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The WikiText directory: ``--data-dir`` if given, else env BERTDS_DATA_DIR, else None (the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise UserError(
            f"data directory {path} does not exist; pass --data-dir (or set {DATA_DIR_ENV}) "
            f"to a directory holding {', '.join(WIKITEXT_FILES.values())}"
        )
    return path


def wikitext_file(directory: Path, split: str) -> Path:
    """The WikiText-2 file of ``split`` in ``directory``, which must exist and hold text."""
    path = directory / WIKITEXT_FILES[wikitext_split(split)]
    if not path.is_file():
        raise UserError(
            f"{path} is missing; the data directory must hold the WikiText-2 files "
            f"{', '.join(WIKITEXT_FILES.values())} (or leave --data-dir unset to use the hub)"
        )
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; point --data-dir at a directory with the WikiText-2 text")
    return path


# --- documents, for the original-BERT recipe ---------------------------------------------------------------------

WIKITEXT_NAMES = {
    "wikitext-2": ("wikitext-2-v1", "tokens"),
    "wikitext-103": ("wikitext-103-v1", "tokens"),
    "wikitext-2-raw": ("wikitext-2-raw-v1", "raw"),
    "wikitext-103-raw": ("wikitext-103-raw-v1", "raw"),
}
FILE_SUFFIXES = (".txt", ".tokens", ".raw", ".jsonl", ".json", ".parquet")
HUB_PREFIX = "hub:"
WIKITEXT_TITLE = re.compile(r"^ ?= [^=].* = ?$")


@dataclass(frozen=True)
class Corpus:
    """Text to pretrain on: local files, or a hub dataset (``hub`` = (name, config or None))."""

    files: tuple[Path, ...] = ()
    hub: tuple[str, str | None] | None = None
    split: str = "train"
    wikitext: bool = False  # " = Title = " documents and "<unk>" for unknown words
    tokenized: bool = False  # WikiText's tokenized text: sentences end at the stand-alone tokens . ! ?

    def fingerprint(self) -> str:
        if self.hub is not None:
            return f"hub:{self.hub[0]}:{self.hub[1]}:{self.split}"
        digest = hashlib.sha256()
        for path in self.files:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()

    def describe(self) -> str:
        if self.hub is not None:
            return f"hub {self.hub[0]}" + (f" ({self.hub[1]})" if self.hub[1] else "") + f" {self.split}"
        return ", ".join(map(str, self.files))

    def documents(self, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
        """One row per document (column ``text``), in corpus order. Streaming reads lazily, one shard per file,
        so ``split_dataset_by_node`` gives each rank whole files (or every world_size-th document)."""
        import datasets

        kwargs: dict[str, Any] = {
            "sources": [str(p) for p in self.files] if self.hub is None else [self.hub],
            "split": self.split,
            "wikitext": self.wikitext,
        }
        if streaming:
            return datasets.IterableDataset.from_generator(_documents, gen_kwargs=kwargs)
        return datasets.Dataset.from_dict({"text": [row["text"] for row in _documents(**kwargs)]})

    def lines(self) -> pa.Array:
        """All lines (WikiText) or paragraphs of the corpus, as one Arrow string array, for the d2l recipe."""
        if self.hub is not None:
            import datasets

            return pa.array(datasets.load_dataset(*self.hub, split=self.split)["text"], type=pa.large_string())
        parts = []
        for path in self.files:
            if path.suffix in (".jsonl", ".json", ".parquet"):
                texts = pa.array(
                    [row["text"] for row in _documents([str(path)], self.split, False)], type=pa.large_string()
                )
                parts.append(pc.list_flatten(pc.split_pattern(texts, "\n")))
            else:
                parts.append(read_lines(path))
        return pa.concat_arrays(parts) if len(parts) > 1 else parts[0]


def read_lines(path: Path) -> pa.Array:
    """The lines of a UTF-8 text file, split by Arrow (no Python string per line)."""
    data = path.read_bytes()
    whole = pa.LargeStringArray.from_buffers(
        1, pa.py_buffer(np.asarray([0, len(data)], dtype=np.int64)), pa.py_buffer(data)
    )
    try:
        whole.validate(full=True)
    except pa.ArrowInvalid:
        raise UserError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    return pc.list_flatten(pc.split_pattern(whole, "\n"))


def resolve_corpus(names: list[str] | None, data_dir: str | None = None, split: str = "train") -> Corpus:
    """``--corpus`` values: None (WikiText-2 from --data-dir, env BERTDS_DATA_DIR or the hub), a WikiText name
    (``wikitext-2``, ``wikitext-103``, ``-raw`` variants; files from --data-dir, else the hub), ``hub:NAME[:CONFIG]``,
    or local files / directories of .txt, .jsonl, .parquet files. ``split`` is checked (and ``valid`` read as
    ``validation``) for all but other hub datasets, whose splits are their own."""
    other_hub = (
        names is not None
        and len(names) == 1
        and names[0].startswith(HUB_PREFIX)
        and names[0][len(HUB_PREFIX) :].partition(":")[0] != HUB_DATASET[0]
    )
    split = split if other_hub else wikitext_split(split)
    if not names:
        directory = wikitext_dir(data_dir)
        if directory is None:
            return Corpus(hub=HUB_DATASET, split=split, wikitext=True, tokenized=True)
        return Corpus(files=(wikitext_file(directory, split),), split=split, wikitext=True, tokenized=True)
    if len(names) == 1 and names[0] in WIKITEXT_NAMES:
        config, kind = WIKITEXT_NAMES[names[0]]
        chosen = data_dir or os.environ.get(DATA_DIR_ENV)
        if not chosen:
            return Corpus(hub=(HUB_DATASET[0], config), split=split, wikitext=True, tokenized=kind == "tokens")
        path = Path(chosen).expanduser() / WIKITEXT_FILES[split].replace(".tokens", f".{kind}")
        if not path.is_file():
            raise UserError(
                f"{path} is missing; point --data-dir at the {names[0]} files, or leave it unset "
                "to download from the hub"
            )
        return Corpus(files=(path,), split=split, wikitext=True, tokenized=kind == "tokens")
    if len(names) == 1 and names[0].startswith(HUB_PREFIX):
        name, _, config = names[0][len(HUB_PREFIX) :].partition(":")
        wikitext = name == HUB_DATASET[0]
        return Corpus(
            hub=(name, config or None), split=split, wikitext=wikitext, tokenized=wikitext and "raw" not in config
        )
    files: list[Path] = []
    for name in names:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
            split_file = path / WIKITEXT_FILES[split]
            files += [split_file] if split_file.is_file() else found
            if not found:
                raise UserError(f"corpus directory {path} holds no {'/'.join(FILE_SUFFIXES)} files")
        elif path.is_file():
            if path.suffix not in FILE_SUFFIXES:
                raise UserError(f"corpus file {path}: unknown format; use {', '.join(FILE_SUFFIXES)} files")
            files.append(path)
        else:
            raise UserError(
                f"corpus {name} does not exist; pass local files or directories, "
                f"{', '.join(WIKITEXT_NAMES)}, or {HUB_PREFIX}NAME for a Hugging Face hub dataset"
            )
    empty = [str(p) for p in files if p.stat().st_size == 0]
    if empty:
        raise UserError(f"corpus file(s) {', '.join(empty)} are empty; remove them from --corpus")
    return Corpus(
        files=tuple(files),
        split=split,
        wikitext=any(p.name.startswith("wiki.") or p.suffix in (".tokens", ".raw") for p in files),
        tokenized=all(p.suffix == ".tokens" for p in files),
    )


def _group_lines(lines, wikitext: bool):
    """Lines -> documents: WikiText titles start a document; elsewhere blank lines end one."""
    document: list[str] = []
    for line in lines:
        if wikitext and WIKITEXT_TITLE.match(line.rstrip("\n")) and document:
            yield {"text": "\n".join(document)}
            document = []
        if line.strip():
            document.append(line.strip())
        elif not wikitext and document:
            yield {"text": "\n".join(document)}
            document = []
    if document:
        yield {"text": "\n".join(document)}


def _documents(sources: list, split: str, wikitext: bool):
    for source in sources:
        if isinstance(source, (tuple, list)):  # a hub dataset
            import datasets

            rows = datasets.load_dataset(source[0], source[1], split=split, streaming=True)
            if wikitext:
                yield from _group_lines((row["text"] for row in rows), wikitext=True)
            else:
                yield from ({"text": row["text"]} for row in rows if row["text"].strip())
            continue
        path = Path(source)
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise UserError(
                                f'{path}:{number} is not a JSON object with a "text" field; '
                                'write one {"text": ...} document per line'
                            ) from None
                        if text.strip():
                            yield {"text": text}
        elif path.suffix == ".parquet":
            table = pq.ParquetFile(path)
            if "text" not in table.schema_arrow.names:
                raise UserError(f'{path} has no "text" column (columns: {", ".join(table.schema_arrow.names)})')
            for batch in table.iter_batches(columns=["text"], batch_size=1024):
                yield from ({"text": t} for t in batch.column(0).to_pylist() if t and t.strip())
        else:
            with path.open(encoding="utf-8") as f:
                yield from _group_lines(f, wikitext)
