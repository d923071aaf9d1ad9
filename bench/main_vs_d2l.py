"""bertds' real main job (``launcher/pretrain.py``, its printed "sentence pairs/sec", data loading included) against
d2l's own training loop (d2l.ai section 15.10 with the ``d2l`` package: ``_read_wiki`` + ``_WikiTextDataset``
batches from its DataLoader, ``d2l.BERTModel``, ``torch.optim.Adam``, the book's timer and its printed
``metric[2] / timer.sum()`` pairs/sec), one after the other in alternating rounds, so that load from other
processes hits both alike. Prints each contender's median pairs/s, its ratio to d2l and the GFLOP/s that pairs/s
means in bertds' model FLOPs per pair (as bench/throughput.py counts them; the share of --peak-tflops given one);
for the main jobs also the losses they logged (last round).

    python bench/main_vs_d2l.py --data-dir ../shared/data/wikitext-2 --rounds 3 --steps 50 \
        --ds-config ds_configs/tiny_cpu.json ds_configs/tiny_cpu_bf16.json --peak-tflops 0.17
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import d2l_book
from bench.throughput import achieved, model_flops, split_parameters
from bertds.errors import UserError, run_cli
from bertds.model import BertForPreTraining, get_config

PAIRS_LINE = re.compile(r"^([\d.]+) sentence pairs/sec", re.M)
BATCH, MAX_LEN = 512, 64  # the default recipe (ds_configs/tiny_cpu.json, --max-len)
STEP_LINE = re.compile(r"^step\s+(\d+)/\d+ \| mlm ([\d.]+) \| nsp ([\d.]+)", re.M)


@dataclass
class Round:
    pairs_per_s: float
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, mlm, nsp) as logged


class MainJob:
    """``python launcher/pretrain.py`` with the default recipe and one DeepSpeed JSON, as a user runs it."""

    def __init__(self, ds_config: str, steps: int, data_dir: str, log_interval: int):
        self.name = f"bertds main job ({Path(ds_config).name})"
        self.ds_config, self.steps, self.data_dir, self.log_interval = ds_config, steps, data_dir, log_interval

    def run(self) -> Round:
        with tempfile.TemporaryDirectory(prefix="bertds-main-job-") as out:
            cmd = [
                sys.executable,
                str(ROOT / "launcher" / "pretrain.py"),
                "--no-wandb",
                "--data-dir",
                self.data_dir,
                "--deepspeed_config",
                self.ds_config,
                "--max-steps",
                str(self.steps),
                "--log-interval",
                str(self.log_interval),
                "--output-dir",
                out,
                "--overwrite",
            ]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a fresh single process of its own
                env.pop(key, None)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        found = PAIRS_LINE.search(proc.stdout)
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        losses = [(int(s), float(m), float(n)) for s, m, n in STEP_LINE.findall(proc.stdout)]
        return Round(float(found.group(1)), losses)


class D2LLoop:
    """The book's ``train_bert`` over its own DataLoader; each round continues the same iterator and model."""

    def __init__(self, d2l, data_dir: str, batch: int, max_len: int, lr: float, steps: int):
        self.name, self.steps = "d2l (its own loop)", steps
        self.vocab_size, self.real_slots = None, []  # real MLM prediction slots of each timed batch
        start = time.perf_counter()
        train_iter, vocab = d2l_book.load_wiki(d2l, data_dir, batch, max_len)
        print(
            f"d2l data: {len(train_iter.dataset)} pairs, vocabulary {len(vocab)}, built by _WikiTextDataset in "
            f"{time.perf_counter() - start:.0f} s (not timed, as in the book)"
        )
        self.batches = (b for _ in itertools.count() for b in train_iter)  # epochs back to back
        self.vocab_size = len(vocab)
        config = get_config("tiny", vocab_size=len(vocab))  # the book's sizes: 128 hidden, 256 FFN, 2 heads, 2 blocks
        self.net = d2l_book.build_bert(d2l, config, next(self.batches))
        self.trainer = d2l_book.BookTrainer(d2l, self.net, len(vocab), lr)
        self.trainer.step_d2l(next(self.batches))  # the lazy-init forward's twin: Adam state, first allocations

    def run(self) -> Round:
        timer_s, pairs = self.trainer.timer_s, self.trainer.pairs
        for _ in range(self.steps):
            batch = next(self.batches)
            self.real_slots.append(int((batch[4] > 0).sum()))
            self.trainer.step_d2l(batch)
        return Round((self.trainer.pairs - pairs) / (self.trainer.timer_s - timer_s))


def compare(contenders: list, rounds: int) -> dict[str, list[Round]]:
    results: dict[str, list[Round]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            results[c.name].append(c.run())
            print(f"  round {r + 1}: {c.name:<44} {results[c.name][-1].pairs_per_s:7.1f} pairs/s", flush=True)
    return results


def flops_per_pair(vocab_size: int, batch: int, max_len: int, slots_per_batch: float) -> float:
    """bertds' model FLOPs of one training step on one pair (bench/throughput.py's count: padded tokens, real MLM
    slots), the same for every contender, so GFLOP/s compares as pairs/s does."""
    model = BertForPreTraining(get_config("tiny", vocab_size=vocab_size))
    per_token, per_slot = split_parameters(model)
    return model_flops(model.config, per_token, per_slot, batch * max_len, slots_per_batch, max_len) / batch


def report(results: dict[str, list[Round]], reference: str, pair_flops: float, peak_tflops: float | None) -> dict:
    ref = statistics.median(x.pairs_per_s for x in results[reference])
    summary = {}
    print(
        f"median of {len(results[reference])} alternating rounds (pairs/s as each prints it; GFLOP/s: "
        f"{pair_flops / 1e6:.1f} MFLOP per pair of bertds' model)"
    )
    for name, runs in results.items():
        median = statistics.median(x.pairs_per_s for x in runs)
        gflops, share = achieved(median * pair_flops, peak_tflops)
        summary[name] = {
            "pairs_per_s": median,
            "ratio_vs_d2l": median / ref,
            "gflops": gflops,
            "peak_pct": share,
            "rounds": [x.pairs_per_s for x in runs],
            "losses": runs[-1].losses,
        }
        print(
            f"  {name:<44} {median:7.1f} pairs/s  ×{median / ref:.2f} vs d2l  {gflops:6.1f} GFLOP/s"
            f"{f' ({share:.1f}% of {peak_tflops} TFLOP/s)' if share is not None else ''}"
            f"  (rounds: {' '.join(f'{x.pairs_per_s:.1f}' for x in runs)})"
        )
    for name, row in summary.items():
        if row["losses"]:
            print(
                f"  {name} losses (last round): "
                + ", ".join(f"step {s}: mlm {m:.3f} nsp {n:.3f}" for s, m, n in row["losses"])
            )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-dir",
        default=os.environ.get("BERTDS_DATA_DIR"),
        help="local WikiText-2 directory (d2l's loop reads wiki.train.tokens); default: env BERTDS_DATA_DIR",
    )
    p.add_argument(
        "--ds-config",
        nargs="+",
        default=[str(ROOT / "ds_configs" / "tiny_cpu.json")],
        help="DeepSpeed JSONs, one main-job contender each",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50, help="main job: --max-steps per round")
    p.add_argument("--d2l-steps", type=int, default=20, help="d2l: timed steps per round")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch threads of d2l's loop (the main job: its own)")
    p.add_argument("--peak-tflops", type=float, help="the machine's dense peak (2 Zen-4 cores: about 0.17 fp32)")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    return run_cli(lambda: compare_main_job_and_d2l(args))


def compare_main_job_and_d2l(args: argparse.Namespace) -> None:
    if not args.data_dir or not (Path(args.data_dir) / "wiki.train.tokens").is_file():
        raise UserError(f"--data-dir {args.data_dir}: no wiki.train.tokens there; pass the WikiText-2 directory")
    if min(args.rounds, args.steps, args.d2l_steps) < 1:
        raise UserError("--rounds, --steps and --d2l-steps must be positive")
    d2l = d2l_book.import_d2l()
    if d2l is None:
        raise UserError("the d2l package is not installed; pip install d2l --no-deps")
    torch.set_num_threads(args.threads)
    data_dir = str(Path(args.data_dir).resolve())
    reference = D2LLoop(d2l, data_dir, batch=BATCH, max_len=MAX_LEN, lr=0.01, steps=args.d2l_steps)
    jobs = [MainJob(str(Path(c).resolve()), args.steps, data_dir, args.log_interval) for c in args.ds_config]
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp: spin, then sleep)")
    print(
        f"d2l: batch {BATCH}, max_len {MAX_LEN}, Adam lr 0.01, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY {policy}, {args.d2l_steps} timed steps per round | main jobs: launcher/pretrain.py default "
        f"recipe (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}), --max-steps {args.steps}"
    )
    results = compare([reference, *jobs], args.rounds)
    pair_flops = flops_per_pair(reference.vocab_size, BATCH, MAX_LEN, statistics.mean(reference.real_slots))
    summary = report(results, reference.name, pair_flops, args.peak_tflops)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
