"""A synthetic three-class sentence-pair task from WikiText-2 sentences, written in SNLI's jsonl format so that the
SNLI reader and fine-tuning run unchanged where no copy of SNLI is at hand. It is not SNLI: the directory holds a
``SYNTHETIC`` marker, the readers name the data "synthetic pair task (not SNLI)", and its accuracy is never to be
compared with SNLI figures.

For a premise sentence: entailment = a contiguous span of it; contradiction = such a span with "not" inserted after
its first word; neutral = a span of another sentence. About 2% of the rows get the gold label ``-`` (no consensus),
which the readers drop, as SNLI's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from bertds.data.corpus import resolve_corpus
from bertds.data.d2l import paragraph_sentences
from bertds.tasks.nli import LABELS, NO_CONSENSUS, SYNTHETIC_MARKER

WIKITEXT_SPLITS = {"train": "train", "dev": "valid", "test": "test"}
MIN_WORDS, MAX_WORDS = 8, 40
NO_CONSENSUS_SHARE = 0.02


def _span(words: list[str], rng: random.Random) -> list[str]:
    length = rng.randint(3, max(3, len(words) // 2))
    start = rng.randint(0, len(words) - length)
    return words[start : start + length]


def synthetic_rows(sentences: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    word_lists = [s.split() for s in sentences if MIN_WORDS <= len(s.split()) <= MAX_WORDS]
    rows = []
    for _ in range(n):
        premise = rng.choice(word_lists)
        label = rng.choice(LABELS)
        if label == "neutral":
            hypothesis = _span(rng.choice(word_lists), rng)
        else:
            hypothesis = _span(premise, rng)
            if label == "contradiction":
                hypothesis = [hypothesis[0], "not", *hypothesis[1:]]
        gold = NO_CONSENSUS if rng.random() < NO_CONSENSUS_SHARE else label
        rows.append(
            {
                "annotator_labels": [label],
                "gold_label": gold,
                "sentence1": " ".join(premise),
                "sentence2": " ".join(hypothesis),
            }
        )
    return rows


def write_synthetic_snli(wikitext_dir: str | Path, out_dir: str | Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Writes ``snli_1.0_{split}.jsonl`` for each split in ``sizes`` (train/dev/test, from the WikiText-2 split of
    the same role) and the ``SYNTHETIC`` marker; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SYNTHETIC_MARKER).write_text(__doc__)
    for i, (split, n) in enumerate(sizes.items()):
        corpus = resolve_corpus(None, str(wikitext_dir), WIKITEXT_SPLITS[split])
        sentences = [s for paragraph in paragraph_sentences(corpus) for s in paragraph]
        rows = synthetic_rows(sentences, n, seed + i)
        (out_dir / f"snli_1.0_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir
