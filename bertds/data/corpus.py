"""WikiText-2 lines from a local directory or the Hugging Face hub, and d2l's paragraph/sentence split."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from bertds.errors import UserError

DATA_DIR_ENV = "BERTDS_DATA_DIR"
WIKITEXT_FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-v1")


@dataclass(frozen=True)
class CorpusSource:
    """Where the WikiText-2 text comes from: a local directory, or the hub when ``data_dir`` is None."""

    data_dir: Path | None

    @classmethod
    def resolve(cls, data_dir: str | os.PathLike | None) -> "CorpusSource":
        """``--data-dir`` if given, else env BERTDS_DATA_DIR, else the hub."""
        chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
        if chosen is None:
            return cls(None)
        path = Path(chosen).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"data directory {path} does not exist; pass --data-dir (or set {DATA_DIR_ENV}) "
                            f"to a directory holding {', '.join(WIKITEXT_FILES.values())}")
        return cls(path)

    def file(self, split: str) -> Path:
        assert self.data_dir is not None
        path = self.data_dir / WIKITEXT_FILES[split]
        if not path.is_file():
            raise UserError(f"{path} is missing; the data directory must hold the WikiText-2 files "
                            f"{', '.join(WIKITEXT_FILES.values())} (or leave --data-dir unset to use the hub)")
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty; point --data-dir at a directory with the WikiText-2 text")
        return path

    def fingerprint(self, split: str) -> str:
        """Identifies the text of a split, for the on-disk cache of prepared examples."""
        if self.data_dir is None:
            return "hub:" + "/".join(HUB_DATASET) + ":" + split
        return hashlib.sha256(self.file(split).read_bytes()).hexdigest()

    def describe(self) -> str:
        return str(self.data_dir) if self.data_dir else "hub " + "/".join(HUB_DATASET)


def load_lines(source: CorpusSource, split: str = "train") -> datasets.Dataset:
    """One row per line of the split, column ``text``."""
    if source.data_dir is None:
        return datasets.load_dataset(*HUB_DATASET, split=split)
    return datasets.Dataset.from_dict({"text": source.file(split).read_text(encoding="utf-8").splitlines()})


def _split_paragraphs(batch: dict) -> dict:
    sentences = (line.strip().lower().split(" . ") for line in batch["text"])
    return {"sentences": [s for s in sentences if len(s) >= 2]}


def load_paragraphs(source: CorpusSource, split: str = "train") -> datasets.Dataset:
    """d2l's ``_read_wiki``: lower-cased lines with at least two sentences (split on ' . '), column ``sentences``."""
    lines = load_lines(source, split)
    paragraphs = lines.map(_split_paragraphs, batched=True, remove_columns=lines.column_names,
                           keep_in_memory=True)
    if len(paragraphs) == 0:
        raise UserError(f"the {split} split of {source.describe()} has no paragraph with two or more sentences "
                        "(sentences are separated by ' . '); check that it is WikiText-2 text")
    return paragraphs
