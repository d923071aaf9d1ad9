"""Natural language inference data (SNLI): readers for SNLI's release formats and the hub, and tokenized pairs.

A data directory holds one file per split, in any of these formats:

- ``snli_1.0_{split}.jsonl``: SNLI's JSON lines (``gold_label``, ``sentence1_binary_parse``/``sentence1``, ...),
- ``snli_1.0_{split}.txt``: SNLI's tab-separated release with a header row naming the same columns,
- ``{split}.tsv``: plain ``label<TAB>premise<TAB>hypothesis``, with or without that header row.

Pairs whose gold label is ``-`` (no annotator consensus) are dropped, as in d2l. From the release formats the text is
the tokenized one of the binary parse with its brackets removed (d2l's ``read_snli``), falling back to the raw
sentence. Without a data directory the splits come from the hub dataset ``stanfordnlp/snli`` (internet).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bertds.data.examples import pack_pairs, truncate_pair
from bertds.data.tokenizer import Vocab
from bertds.errors import UserError

LABELS = ("entailment", "neutral", "contradiction")
NO_CONSENSUS = "-"
SPLITS = ("train", "dev", "test")
HUB_DATASET = "stanfordnlp/snli"
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
TSV_HEADER = ["label", "premise", "hypothesis"]
SYNTHETIC_MARKER = "SYNTHETIC"  # a file in a data directory whose pairs are not SNLI (see tasks/synthetic.py)


@dataclass
class NLIPairs:
    premises: list[str]
    hypotheses: list[str]
    labels: list[int]  # indices into LABELS
    source: str  # where the pairs come from, for reports

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int | None, seed: int) -> NLIPairs:
        """A seeded random subset of n pairs (all of them when n is None or not smaller)."""
        if n is None or n >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return NLIPairs(
            [self.premises[i] for i in keep],
            [self.hypotheses[i] for i in keep],
            [self.labels[i] for i in keep],
            f"{self.source}, {n} sampled pairs",
        )


def split_files(data_dir: Path, split: str) -> list[Path]:
    return [data_dir / f"snli_1.0_{split}.jsonl", data_dir / f"snli_1.0_{split}.txt", data_dir / f"{split}.tsv"]


def _unparse(parse: str) -> str:
    """The tokenized sentence of an SNLI binary parse: brackets removed, whitespace collapsed (d2l)."""
    return " ".join(re.sub(r"[()]", " ", parse).split())


class _Reader:
    """Collects labelled pairs from one file; errors name the file and line."""

    def __init__(self, path: Path):
        self.path, self.line = path, 0
        self.pairs = NLIPairs([], [], [], str(path))

    def error(self, problem: str) -> UserError:
        return UserError(f"{self.path} line {self.line}: {problem}; fix or remove that line")

    def add(self, label: str, premise: str, hypothesis: str) -> None:
        if label == NO_CONSENSUS:
            return
        if label not in LABELS:
            raise self.error(f"unknown label '{label}' (expected {', '.join(LABELS)} or '{NO_CONSENSUS}')")
        if not premise.strip() or not hypothesis.strip():
            raise self.error("empty premise or hypothesis")
        self.pairs.premises.append(premise)
        self.pairs.hypotheses.append(hypothesis)
        self.pairs.labels.append(LABELS.index(label))

    def text(self, row: dict, sentence: str) -> str:
        if row.get(f"{sentence}_binary_parse"):
            return _unparse(row[f"{sentence}_binary_parse"])
        if sentence not in row:
            raise self.error(f"no '{sentence}' or '{sentence}_binary_parse' field")
        return row[sentence]

    def lines(self):
        with open(self.path, encoding="utf-8") as f:
            for self.line, raw in enumerate(f, start=1):
                if raw.strip():
                    yield raw.rstrip("\n").rstrip("\r")


def read_jsonl(path: Path) -> NLIPairs:
    reader = _Reader(path)
    for line in reader.lines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise reader.error(f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "gold_label" not in row:
            raise reader.error("not a JSON object with a 'gold_label'")
        reader.add(row["gold_label"], reader.text(row, "sentence1"), reader.text(row, "sentence2"))
    return reader.pairs


def read_snli_txt(path: Path) -> NLIPairs:
    reader = _Reader(path)
    header = None
    for line in reader.lines():
        fields = line.split("\t")
        if header is None:
            header = fields
            if "gold_label" not in header:
                raise reader.error("the header row lacks 'gold_label' (expected SNLI's snli_1.0_*.txt columns)")
            continue
        if len(fields) != len(header):
            raise reader.error(f"{len(fields)} tab-separated fields where the header has {len(header)}")
        row = dict(zip(header, fields))
        reader.add(row["gold_label"], reader.text(row, "sentence1"), reader.text(row, "sentence2"))
    return reader.pairs


def read_tsv(path: Path) -> NLIPairs:
    reader = _Reader(path)
    for line in reader.lines():
        fields = line.split("\t")
        if reader.line == 1 and fields == TSV_HEADER:
            continue
        if len(fields) != 3:
            raise reader.error(f"{len(fields)} tab-separated fields (expected label, premise, hypothesis)")
        reader.add(*fields)
    return reader.pairs


READERS = {".jsonl": read_jsonl, ".txt": read_snli_txt, ".tsv": read_tsv}


def read_nli_file(path: str | Path) -> NLIPairs:
    path = Path(path)
    if path.suffix not in READERS:
        raise UserError(
            f"{path}: unknown NLI file format; use SNLI's .jsonl or .txt, or a label<TAB>premise<TAB>hypothesis .tsv"
        )
    pairs = READERS[path.suffix](path)
    if not len(pairs):
        raise UserError(f"{path} holds no labelled pairs; point at a non-empty SNLI split")
    return pairs


def load_split(data_dir: str | Path | None, split: str) -> NLIPairs:
    """One split (train/dev/test) from a data directory, or from the hub when ``data_dir`` is None."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if data_dir is None:
        return _load_hub_split(split)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"NLI data directory {data_dir} does not exist; pass --data-dir with SNLI's files")
    candidates = split_files(data_dir, split)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        present = [s for s in SPLITS if any(p.is_file() for p in split_files(data_dir, s))]
        raise UserError(
            f"no {split} split in {data_dir} (looked for {', '.join(p.name for p in candidates)}); "
            f"the splits there are {', '.join(present) or 'none'}: choose one with --train-split/"
            "--eval-splits"
        )
    pairs = read_nli_file(found)
    if (data_dir / SYNTHETIC_MARKER).is_file():
        pairs.source = f"synthetic pair task (not SNLI) {found}"
    return pairs


def _load_hub_split(split: str) -> NLIPairs:
    import datasets

    rows = datasets.load_dataset(HUB_DATASET, split=HUB_SPLITS[split])
    rows = rows.filter(lambda label: label >= 0, input_columns="label")  # -1: no gold label
    return NLIPairs(rows["premise"], rows["hypothesis"], rows["label"], f"{HUB_DATASET} {HUB_SPLITS[split]}")


class TokenizedPairs(torch.utils.data.Dataset):
    """Premise and hypothesis token ids, cut longest-first so that ``<cls> p <sep> h <sep>`` fits ``max_len``."""

    def __init__(self, pairs: NLIPairs, vocab: Vocab, max_len: int):
        if max_len < 5:
            raise UserError(f"--max-len {max_len} leaves no room for text beside <cls> and two <sep>; use >= 5")
        premises, hypotheses = vocab.encode(pairs.premises), vocab.encode(pairs.hypotheses)
        self.pairs = [truncate_pair(p, h, max_len - 3) for p, h in zip(premises, hypotheses)]
        self.labels = pairs.labels
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], int]:
        return (*self.pairs[i], self.labels[i])

    def collate(self, items: list[tuple[list[int], list[int], int]]) -> dict[str, torch.Tensor]:
        """Padded to the longest pair of the batch (masked positions do not change the result)."""
        premises, hypotheses, labels = zip(*items)
        longest = max(len(p) + len(h) for p, h in zip(premises, hypotheses)) + 3
        tokens, segments, valid_len, _ = pack_pairs(list(premises), list(hypotheses), self.vocab, longest)
        return {
            "tokens": torch.from_numpy(tokens).long(),
            "segments": torch.from_numpy(segments).long(),
            "valid_len": torch.from_numpy(valid_len).long(),
            "label": torch.tensor(labels),
        }
