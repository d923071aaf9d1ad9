"""Does pretraining help? Pretrain on WikiText-2, fine-tune on SNLI, and print the test accuracy beside that of the
same shape fine-tuned from random initialisation (not a test).

    python bench/finetune_snli.py                                  # pretrains the README's recipe first
    python bench/finetune_snli.py --pretrained runs/p              # fine-tune a finished pretraining run instead
    python bench/finetune_snli.py --pretrain 1500:0.002 --pretrain-flags "--dropout 0.2" --seeds 0

Each ``STEPS:LR`` pretrains a fresh model (``--model``, ``--pretrain-config``, ``--pretrain-flags``); ``--pretrained``
takes finished runs instead (a long pretraining split into shorter ``--resume auto`` pieces). Each pretrained model
and a randomly initialised one of the same shape, dropout and vocabulary are then fine-tuned with each of
``--seeds`` and scored on the held-out split after the last epoch. The table gives the pretraining run's steps,
seconds per step (median of its logged pairs/s) and final held-out MLM / NSP accuracy. The data is real SNLI where a
copy is at hand (``--snli-dir``, default ../shared/data/snli): its train split when present, else dev as the training
set with test held out; without a copy, the synthetic WikiText-2 pair task, named as such. d2l's SNLI test accuracy,
0.786 (bert.small, 5 epochs on full SNLI, 2 GPUs), is printed beside the figures only for real SNLI.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
D2L_SNLI_TEST_ACCURACY = 0.786
# The README's "A recipe that helps fine-tuning" (with ds_configs/snli_recipe.json).
RECIPE_STEPS = "7200:0.002"
RECIPE_FLAGS = "--dropout 0.1 --dupe-factor 24 --eval-interval 0"
RECIPE_RANKS = 2
RECIPE_EPOCHS = 10
RECIPE_LR = 2e-4


def run(command: list[str], log: Path) -> float:
    """Runs ``command`` to completion; returns its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        if subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"failed: {' '.join(command)} (see {log})")
    return time.perf_counter() - start


def nli_data(args, work: Path) -> tuple[list[str], str, bool]:
    snli = Path(args.snli_dir)
    from bertds.tasks.nli import split_files

    if any(p.is_file() for p in split_files(snli, "train")):
        return ["--data-dir", str(snli), "--eval-splits", "test"], "SNLI train -> test", True
    if any(p.is_file() for p in split_files(snli, "test")):
        return (
            ["--data-dir", str(snli), "--train-split", "dev", "--eval-splits", "test"],
            "SNLI dev (9,842 pairs; no train split at hand) -> test",
            True,
        )
    from bertds.tasks.synthetic import write_synthetic_snli

    directory = write_synthetic_snli(args.wikitext_dir, work / "synthetic", {"train": 10000, "test": 10000})
    return (
        ["--data-dir", str(directory), "--train-split", "train", "--eval-splits", "test"],
        "synthetic WikiText-2 pair task (NOT SNLI)",
        False,
    )


def random_init_like(pretrained: Path, directory: Path, seed: int) -> Path:
    """A run directory with the pretrained run's config and vocabulary and freshly initialised weights."""
    import torch

    from bertds import BertForPreTraining, load_pretrained, save_pretrained

    model, vocab = load_pretrained(pretrained)
    torch.manual_seed(seed)
    fresh = BertForPreTraining(model.config)
    save_pretrained(fresh.state_dict(), fresh.config, vocab, directory)
    return directory


def pretraining_figures(run_dir: Path) -> dict:
    """Steps, seconds per step (median of the logged pairs/s), minutes of the training clock (the steps alone: no
    start-up, evaluation or checkpoints) and the final held-out MLM / NSP accuracy of a run."""
    from bertds.engine.tracking import read_metrics

    run = json.loads((run_dir / "train_config.json").read_text())
    batch = run["deepspeed"]["train_batch_size"]
    rates = sorted(m["pairs_per_s"] for m in read_metrics(run_dir) if "pairs_per_s" in m)
    held_out = run["result"].get("eval", {})
    return {
        "steps": run["result"]["steps"],
        "s_per_step": batch / rates[len(rates) // 2] if rates else float("nan"),
        "minutes": run["result"]["steps"] * batch / run["result"]["pairs_per_s"] / 60,
        "mlm_acc": held_out.get("mlm_accuracy", float("nan")),
        "nsp_acc": held_out.get("nsp_accuracy", held_out.get("sop_accuracy", float("nan"))),
    }


def finetune(args, data_args: list[str], checkpoint: Path, output_dir: Path, seed: int) -> float:
    subsets = (
        ["--max-train-pairs", str(args.max_pairs), "--max-eval-pairs", str(args.max_pairs)] if args.max_pairs else []
    )
    run(
        [
            sys.executable,
            "launcher/finetune_snli.py",
            "--checkpoint",
            str(checkpoint),
            *data_args,
            *subsets,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--max-len",
            str(args.max_len),
            "--seed",
            str(seed),
            "--output-dir",
            str(output_dir),
        ],
        output_dir.with_suffix(".log"),
    )
    return json.loads((output_dir / "finetune_config.json").read_text())["result"]["final"]["test_acc"]


def summary(accuracies: list[float]) -> str:
    """Mean, then each seed's accuracy."""
    return f"{statistics.mean(accuracies):.3f} ({' / '.join(f'{a:.3f}' for a in accuracies)})"


def pretrain(args, spec: str, work: Path) -> Path:
    """Pretrains ``STEPS:LR`` with ``--model``, ``--pretrain-config`` and ``--pretrain-flags``; returns the run."""
    steps, lr = spec.split(":")
    pretrained = work / f"pretrain_{args.model}_{steps}_{lr}"
    ranks = (
        ["-m", "torch.distributed.run", "--nproc_per_node", str(args.pretrain_ranks)] if args.pretrain_ranks > 1 else []
    )
    command = [sys.executable, *ranks, "launcher/pretrain.py", "--data-dir", args.wikitext_dir, "--model", args.model]
    command += ["--deepspeed_config", args.pretrain_config, "--output-dir", str(pretrained), "--max-steps", steps]
    command += ["--lr", lr, "--no-wandb", "--overwrite", *shlex.split(args.pretrain_flags)]
    command += ["--batch-size", str(args.pretrain_batch)] if args.pretrain_batch else []
    run(command, work / f"{pretrained.name}.log")
    return pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", nargs="+", default=[RECIPE_STEPS], help="STEPS:LR pretraining runs")
    p.add_argument("--pretrained", nargs="+", default=[], help="finished pretraining runs to fine-tune instead")
    p.add_argument("--model", default="tiny")
    p.add_argument("--pretrain-config", default=str(REPO / "ds_configs" / "snli_recipe.json"))
    p.add_argument("--pretrain-batch", type=int, help="pretraining global batch; default: the JSON's")
    p.add_argument("--pretrain-flags", default=RECIPE_FLAGS, help="further launcher/pretrain.py flags")
    p.add_argument(
        "--pretrain-ranks", type=int, default=RECIPE_RANKS, help="pretraining processes (torchrun; CPU: one per core)"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (also of the random init)"
    )
    p.add_argument("--epochs", type=int, default=RECIPE_EPOCHS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=RECIPE_LR)
    p.add_argument("--max-len", type=int, default=64, help="fine-tuning max_len")
    p.add_argument("--max-pairs", type=int, help="fine-tune and score on seeded subsets of this many pairs")
    p.add_argument("--wikitext-dir", default=str(REPO.parent / "shared" / "data" / "wikitext-2"))
    p.add_argument("--snli-dir", default=str(REPO.parent / "shared" / "data" / "snli"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "bench_finetune_snli"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_args, data_name, real_snli = nli_data(args, work)
    runs = [Path(r) for r in args.pretrained] or [pretrain(args, spec, work) for spec in args.pretrain]
    rows = []
    for pretrained in runs:
        accuracy: dict[str, list[float]] = {"pretrained": [], "random init": []}
        for seed in args.seeds:
            random_init = random_init_like(pretrained, work / f"random_{pretrained.name}_{seed}", seed)
            for kind, checkpoint in (("pretrained", pretrained), ("random init", random_init)):
                tag = kind.replace(" ", "_")
                output_dir = work / f"ft_{tag}_{pretrained.name}_{seed}"
                accuracy[kind].append(finetune(args, data_args, checkpoint, output_dir, seed))
        rows.append((pretrained, pretraining_figures(pretrained), accuracy))

    print(
        f"data: {data_name}; fine-tuning {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, max_len "
        f"{args.max_len}, seeds {args.seeds}, test accuracy after the last epoch"
    )
    print(
        "| pretraining run | steps | s/step | training clock | held-out MLM acc | held-out NSP acc "
        "| SNLI test, pretrained | SNLI test, random init | gain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for pretrained, figures, accuracy in rows:
        gain = statistics.mean(accuracy["pretrained"]) - statistics.mean(accuracy["random init"])
        print(
            f"| {pretrained.name} | {figures['steps']} | {figures['s_per_step']:.3f} | {figures['minutes']:.1f} min"
            f" | {figures['mlm_acc']:.3f} "
            f"| {figures['nsp_acc']:.3f} | {summary(accuracy['pretrained'])} | {summary(accuracy['random init'])} "
            f"| {100 * gain:+.1f} points |"
        )
    if real_snli:
        print(
            f"d2l (bert.small pretrained on WikiText-2, 5 epochs on full SNLI train, 2 GPUs): test accuracy "
            f"{D2L_SNLI_TEST_ACCURACY}"
            + ("" if "train ->" in data_name else "; not comparable: here only the 9,842 dev pairs train the model")
        )


if __name__ == "__main__":
    main()
