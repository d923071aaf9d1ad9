"""Held-out evaluation: masked-LM loss, accuracy and perplexity over the real prediction slots, NSP (or SOP) loss
and accuracy, on examples made once with the training run's own tokenizer and recipe (static masks at 15%, a fixed
seed, cached like the training data), so every evaluation of every run on that data scores the same slots.

    python -m bertds.evaluate --checkpoint RUN_DIR | CHECKPOINT_DIR | HF_DIR [--data-dir DIR] [--eval-split S] [--json]

A run directory or DeepSpeed checkpoint brings its data recipe (``train_config.json``); for a Hugging Face
directory pass the data flags of the run (``--data-dir``, ``--recipe``, ``--max-len``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bertds.data.config import DataConfig, add_data_arguments
from bertds.data.corpus import resolve_corpus
from bertds.data.loader import rank_range, table_columns
from bertds.data.masking import MASK_RATE
from bertds.data.prepare import TokenizerChoice, example_config, prepare_directory, prepare_for_training
from bertds.data.shards import MANIFEST, PreparedData, load_prepared
from bertds.data.tokenizer import TOKENIZER_FILE
from bertds.errors import UserError, run_cli
from bertds.options import add_options, from_args, option

if TYPE_CHECKING:
    import datasets

EVAL_SEED = 1234  # the held-out masks: the same for every run, whatever its --seed
HELDOUT_PREFIX = "heldout-"  # prepare_data.py writes OUT/heldout-SPLIT beside the training shards
RECIPE_FIELDS = ("max_len", "truncate", "recipe", "sentence_task", "short_seq_prob", "whole_word_masking")
TRAIN_CONFIG = "train_config.json"
DEFAULT_BATCH = 64
EVAL_PREFIX = "eval_"  # the flags are --eval-interval, --eval-split, ...
DEFAULT_EXAMPLES = 1000  # keeps an evaluation to seconds on a CPU; MLPerf's BERT evaluates 10,000


@dataclass
class EvalConfig:
    """Held-out evaluation flags of ``launcher/pretrain.py``."""

    interval: int = option(0, "steps between held-out evaluations (0: only at the end of the run)")
    split: str = option(
        "validation", "held-out split of the corpus (WikiText: wiki.valid.tokens; hub: its validation split)"
    )
    corpus: list[str] | None = option(
        None, "held-out text instead (same forms as --corpus); default: the training corpus' --eval-split"
    )
    examples: int = option(
        DEFAULT_EXAMPLES, f"score the first K held-out examples (default {DEFAULT_EXAMPLES}; 0: all)"
    )

    def __post_init__(self) -> None:
        if self.interval < 0 or self.examples < 0:
            raise UserError(
                f"--eval-interval {self.interval} / --eval-examples {self.examples}: both must be 0 "
                "or more (interval 0: only at the end; examples 0: all)"
            )


def add_eval_arguments(parser: argparse.ArgumentParser, interval: bool = True) -> None:
    add_options(
        parser.add_argument_group("held-out evaluation"),
        EvalConfig,
        skip=() if interval else ("interval",),
        prefix=EVAL_PREFIX,
    )


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    return from_args(EvalConfig, args, prefix=EVAL_PREFIX)


def _split_exists(train: DataConfig, split: str) -> bool:
    """Whether the training corpus has other text under ``split`` (a local file list has no splits)."""
    try:
        held_out = resolve_corpus(train.corpus, train.data_dir, split)
        training = resolve_corpus(train.corpus, train.data_dir, train.split)
    except UserError:
        return False
    return held_out.hub is not None or held_out.files != training.files


def heldout_data_config(train: DataConfig, recipe: dict, tokenizer_file: Path, cfg: EvalConfig) -> DataConfig | None:
    """The data config of the held-out examples: the training corpus at ``cfg.split`` (or ``cfg.corpus``), the
    training tokenizer (its file), the training recipe (``recipe``: a manifest's fields), static masks at 15% from
    EVAL_SEED. None when no held-out text is known."""
    names = cfg.corpus
    if names is None:
        if train.prepared or not _split_exists(train, cfg.split):
            return None
        names = train.corpus
    return dataclasses.replace(
        train,
        **{k: recipe[k] for k in RECIPE_FIELDS if k in recipe},
        corpus=names,
        split=cfg.split,
        prepared=None,
        streaming=False,
        tokenizer=str(tokenizer_file),
        seed=EVAL_SEED,
        masking="static",
        mask_prob=MASK_RATE,
        max_predictions=None,
        dupe_factor=1,
        num_workers=0,
    )


def heldout_examples(train: DataConfig, data: PreparedData, cfg: EvalConfig, rank: int = 0) -> datasets.Dataset | None:
    """The held-out examples of a training run whose data is ``data``: ``--prepared DIR``'s ``heldout-SPLIT`` when
    prepare_data.py wrote one, else prepared (rank 0, the others wait) into the cache. None without held-out text."""
    prepared_heldout = data.path / f"{HELDOUT_PREFIX}{cfg.split}"
    if cfg.corpus is None and (prepared_heldout / MANIFEST).is_file():
        examples = load_prepared(prepared_heldout).examples
    else:
        config = heldout_data_config(train, data.manifest or {}, data.path / TOKENIZER_FILE, cfg)
        if config is None:
            return None
        examples = prepare_for_training(config, rank).examples
    return examples.select(range(min(cfg.examples, len(examples)))) if cfg.examples else examples


def prepare_heldout(train: DataConfig, data: PreparedData, cfg: EvalConfig) -> PreparedData | None:
    """``prepare_data.py``: the held-out examples of the prepared directory ``data`` as ``DIR/heldout-SPLIT``
    (made with DIR's tokenizer and recipe), which training with ``--prepared DIR`` then scores. None without
    held-out text."""
    config = heldout_data_config(train, data.manifest or {}, data.path / TOKENIZER_FILE, cfg)
    if config is None:
        return None
    path = data.path / f"{HELDOUT_PREFIX}{cfg.split}"
    return prepare_directory(
        resolve_corpus(config.corpus, config.data_dir, config.split),
        TokenizerChoice(config.tokenizer, config.vocab_size, config.min_freq),
        example_config(config),
        path,
    )


def _tensors(columns: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.array(v, dtype=np.int64 if v.dtype.kind == "i" else v.dtype)).to(device)
        for k, v in columns.items()
    }


@torch.no_grad()
def score(
    model,
    examples: datasets.Dataset,
    micro_batch: int,
    device: torch.device,
    sentence_loss: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Metrics of ``model`` (a module or a DeepSpeed engine) on ``examples``: each rank scores its contiguous share
    and the sums are all-reduced. Every rank runs the same number of forwards (ZeRO-3 gathers the weights in
    them), a rank with fewer batches an extra one whose result it drops. Eval mode, no gradient, no random draw:
    weights and RNG states are as before."""
    share = rank_range(len(examples), rank, world_size)
    rows = examples.with_format("arrow")
    batches = math.ceil(math.ceil(len(examples) / world_size) / micro_batch)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # mlm CE, mlm correct, slots, nsp CE, correct, pairs
    was_training = model.training
    model.eval()
    try:
        for b in range(batches):
            start = share.start + b * micro_batch
            stop = min(start + micro_batch, share.stop)
            real = start < stop
            batch = _tensors(table_columns(rows[start:stop] if real else rows[0:1]), device)
            out = model(**batch)
            if not real:
                continue
            logits, label = out.seq_relationship_logits.float(), batch["nsp_label"]
            sums += torch.stack(
                [
                    out.mlm_loss.double() * (out.mlm_count.double() + 1e-8),
                    out.mlm_correct.double(),
                    out.mlm_count.double(),
                    F.cross_entropy(logits, label, reduction="sum").double(),
                    (logits.argmax(-1) == label).sum().double(),
                    torch.tensor(float(len(label)), dtype=torch.float64, device=device),
                ]
            )
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    mlm_ce, mlm_correct, slots, nsp_ce, nsp_correct, pairs = sums.tolist()
    mlm_loss = mlm_ce / max(slots, 1)
    return {
        "mlm_loss": mlm_loss,
        "mlm_accuracy": mlm_correct / max(slots, 1),
        "perplexity": math.exp(mlm_loss),
        "nsp_loss": nsp_ce / max(pairs, 1) if sentence_loss else None,
        "nsp_accuracy": nsp_correct / max(pairs, 1) if sentence_loss else None,
        "examples": int(pairs),
    }


def describe(metrics: dict, split: str) -> str:
    line = (
        f"{split} | mlm loss {metrics['mlm_loss']:.3f} | mlm acc {metrics['mlm_accuracy']:.3f} | "
        f"ppl {metrics['perplexity']:.1f}"
    )
    if metrics["nsp_loss"] is not None:
        line += f" | nsp loss {metrics['nsp_loss']:.3f} | nsp acc {metrics['nsp_accuracy']:.3f}"
    return line + f" | {metrics['examples']} examples"


class HeldOutEvaluation:
    """What the training loop calls at its eval steps (``launcher/pretrain.py --eval-interval``)."""

    def __init__(
        self, examples: datasets.Dataset, split: str, micro_batch: int, device: torch.device, rank: int, world_size: int
    ):
        self.examples, self.split, self.micro_batch, self.device = examples, split, micro_batch, device
        self.rank, self.world_size = rank, world_size
        self.last: dict | None = None

    def __call__(self, engine, sentence_loss: bool) -> dict:
        start = time.perf_counter()
        metrics = score(engine, self.examples, self.micro_batch, self.device, sentence_loss, self.rank, self.world_size)
        self.last = {"split": self.split, **metrics, "eval_seconds": time.perf_counter() - start}
        return self.last


def find_train_config(checkpoint: Path) -> dict | None:
    """The train_config.json of the run a checkpoint belongs to (run dir, checkpoints/, or a tag directory)."""
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (directory / TRAIN_CONFIG).is_file():
            return json.loads((directory / TRAIN_CONFIG).read_text())
    return None


def _data_config(args: argparse.Namespace, explicit: set[str], run: dict | None) -> DataConfig:
    """The run's data config, with the data flags given on the command line on top."""
    base = DataConfig(
        **{
            k: v
            for k, v in (run or {}).get("train", {}).get("data", {}).items()
            if k in DataConfig.__dataclass_fields__
        }
    )
    return dataclasses.replace(base, **{k: getattr(args, k) for k in explicit if k in DataConfig.__dataclass_fields__})


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: DataConfig,
    cfg: EvalConfig,
    micro_batch: int = DEFAULT_BATCH,
    cache_dir: str | None = None,
) -> dict:
    """Held-out metrics of any finished run, DeepSpeed checkpoint or Hugging Face BERT directory (on the CPU)."""
    checkpoint = Path(checkpoint)
    from bertds.export import load_any

    model, vocab = load_any(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(tmp)  # the tokenizer file the held-out examples are keyed by (bytes as the run's data dir)
        if data.prepared and cfg.corpus is None and (Path(data.prepared) / f"{HELDOUT_PREFIX}{cfg.split}").is_dir():
            examples = load_prepared(Path(data.prepared) / f"{HELDOUT_PREFIX}{cfg.split}").examples
        else:
            recipe = json.loads((Path(data.prepared) / MANIFEST).read_text()) if data.prepared else {}
            config = heldout_data_config(
                dataclasses.replace(data, cache_dir=cache_dir or data.cache_dir),
                recipe,
                Path(tmp) / TOKENIZER_FILE,
                cfg,
            )
            if config is None:
                raise UserError(
                    f"no held-out text for {checkpoint}: its corpus has no '{cfg.split}' split; pass "
                    "--eval-corpus or --data-dir"
                )
            examples = prepare_for_training(config, 0).examples
    if cfg.examples:
        examples = examples.select(range(min(cfg.examples, len(examples))))
    metrics = score(model, examples, micro_batch, torch.device("cpu"), model.config.sentence_loss)
    return {"split": cfg.split, **metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="finished run, DeepSpeed checkpoint or HF directory")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="examples per forward")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_eval_arguments(parser, interval=False)
    add_data_arguments(parser)
    data_flags = list(DataConfig.__dataclass_fields__)
    parser.set_defaults(**{name: None for name in data_flags})  # None: not given, the run's value stays
    args = parser.parse_args(argv)
    explicit = {name for name in data_flags if getattr(args, name) is not None}

    def run() -> int:
        cfg = eval_config_from_args(args)
        found = find_train_config(Path(args.checkpoint))
        if found is not None and "eval" in found.get("train", {}) and args.eval_corpus is None:
            cfg = dataclasses.replace(cfg, corpus=found["train"]["eval"].get("corpus"))
        metrics = evaluate_checkpoint(
            args.checkpoint, _data_config(args, explicit, found), cfg, args.batch_size, args.cache_dir
        )
        print(json.dumps(metrics) if args.json else f"eval {args.checkpoint} | {describe(metrics, cfg.split)}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
