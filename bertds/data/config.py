"""Data options of the pretraining command line, as a typed config: each flag's default, type, help and check are
declared once, here."""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bertds.data.tokenizer import DEFAULT_WORDPIECE_VOCAB
from bertds.errors import UserError
from bertds.options import add_options, from_args, option

MIN_MAX_LEN = 5  # <cls> A <sep> B <sep> with at least one token in each segment
MAX_MAX_LEN = 512


@dataclass
class DataConfig:
    data_dir: str | None = option(
        None, "directory with wiki.{train,valid,test}.tokens; default: env BERTDS_DATA_DIR, else the Hugging Face hub"
    )
    cache_dir: str | None = option(None, "prepared-example cache; default: env BERTDS_CACHE_DIR or ~/.cache/bertds")
    max_len: int = option(64, "tokens per sentence pair, incl. <cls>/<sep>")
    seed: int = option(0, "data order, masking and initialisation seed")
    truncate: bool = option(False, "truncate over-long pairs instead of dropping them")
    num_workers: int = option(0, "data loader worker processes per rank")
    corpus: list[str] | None = option(
        None,
        "wikitext-2, wikitext-103 (-raw), .txt/.jsonl/.parquet files or "
        "directories, or hub:NAME[:CONFIG]; default: WikiText-2",
    )
    split: str = option("train", "corpus split (WikiText and hub corpora)")
    prepared: str | None = option(None, "a directory written by launcher/prepare_data.py (skips preparation)")
    streaming: bool = option(False, "read the corpus lazily (larger than memory); each rank prepares a disjoint part")
    tokenizer: str = option(
        "word", "word (d2l), wordpiece (trained on the corpus), or a BERT vocab.txt / tokenizer.json path"
    )
    vocab_size: int = option(DEFAULT_WORDPIECE_VOCAB, "WordPiece vocabulary size")
    min_freq: int = option(5, "word vocabulary: minimum word count")
    recipe: str = option(
        "d2l",
        "example creation: d2l (sentence pairs of paragraphs) or bert (Google's: "
        "documents, segments filled to max_len)",
        choices=["d2l", "bert"],
    )
    sentence_task: str = option(
        "nsp",
        "next sentence (nsp) or sentence order (sop, ALBERT) prediction, sop needs "
        "--recipe bert; none: MLM only (RoBERTa), no sentence loss",
        choices=["nsp", "sop", "none"],
    )
    short_seq_prob: float = option(0.1, "bert recipe: share of shorter targets")
    max_predictions: int | None = option(
        None, "MLM slots per example; default 15%% of max_len (d2l), 20 at 128 / 80 at 512 (bert)"
    )
    whole_word_masking: bool = option(False, "mask all pieces of a word together")
    masking: str = option(
        "static",
        "static: masks fixed at preparation; dynamic: drawn every epoch (RoBERTa)",
        choices=["static", "dynamic"],
    )
    dupe_factor: int = option(1, "static masking: copies of the corpus with different pairs and masks")
    mask_prob: float = option(
        0.15, "share of each sequence's tokens predicted (MosaicBERT: 0.30); evaluation stays at 0.15"
    )

    def __post_init__(self) -> None:
        if self.max_len > MAX_MAX_LEN:
            raise UserError(
                f"--max-len {self.max_len} exceeds the model's {MAX_MAX_LEN} positions; pass {MAX_MAX_LEN} or less"
            )
        if self.max_len < MIN_MAX_LEN:
            raise UserError(
                f"--max-len {self.max_len}: must be in {MIN_MAX_LEN}..{MAX_MAX_LEN} (<cls> A <sep> B "
                f"<sep> needs {MIN_MAX_LEN} tokens to keep one in each segment)"
            )
        if not 0 < self.mask_prob < 1:
            raise UserError(f"--mask-prob {self.mask_prob}: the share of tokens predicted must be between 0 and 1")
        if not 0 <= self.short_seq_prob <= 1:
            raise UserError(f"--short-seq-prob {self.short_seq_prob}: must be between 0 and 1")
        minimums = {"num_workers": 0, "dupe_factor": 1, "min_freq": 0, "max_predictions": 1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise UserError(f"--{name.replace('_', '-')} {value}: must be {minimum} or more")
        if self.cache_dir is not None and not self.prepared:
            check_writable_dir(Path(self.cache_dir).expanduser(), "--cache-dir")


def check_writable_dir(path: Path, flag: str) -> None:
    """``path`` is a directory this process can write into, or can be created (checked before any work). Tried
    with a directory made and removed there: permission bits do not stop root, and some file systems (sysfs,
    root-squashed NFS) refuse writes that ``access()`` allows."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a directory; pass a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bertds-write-check-", dir=existing))
    except OSError as e:
        raise UserError(
            f"{flag} {path}: {existing} is not writable ({e.strerror}); pass a writable directory"
        ) from None


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_options(parser.add_argument_group("data"), DataConfig)
    return parser


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    return from_args(DataConfig, args)
