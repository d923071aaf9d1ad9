"""Does pretraining help? Pretrain on WikiText-2, fine-tune on SNLI, and print the test accuracy beside that of the
same shape fine-tuned from random initialisation (not a test).

    python bench/finetune_snli.py                                       # d2l's 50 steps at lr 0.01, then 150 at 1e-3
    python bench/finetune_snli.py --pretrain 600:0.001 --pretrain-config ds_configs/tiny_cpu.json --seeds 0 1 2

Each ``STEPS:LR`` pretrains a fresh model (``--model``, ``--pretrain-config``, ``--pretrain-batch``, max_len 64); the
pretrained model and a randomly initialised one of the same shape and vocabulary are then fine-tuned with each of
``--seeds`` and scored on the held-out split. The data is real SNLI where a copy is at hand (``--snli-dir``, default
../shared/data/snli): its train split when present, else dev as the training set with test held out; without a
copy, the synthetic WikiText-2 pair task, named as such. d2l's SNLI test accuracy, 0.786 (bert.small, 5 epochs on
full SNLI, 2 GPUs), is printed beside the figures only for real SNLI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
D2L_SNLI_TEST_ACCURACY = 0.786


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


def pretraining_figures(run_dir: Path) -> str:
    """The last logged training MLM accuracy and NSP loss, and held-out figures when the run has them."""
    from bertds.engine.tracking import read_metrics
    from bertds.model_card import held_out_metrics

    last = [m for m in read_metrics(run_dir) if "mlm_accuracy" in m][-1]
    result = json.loads((run_dir / "train_config.json").read_text())["result"]
    held_out = ", ".join(f"{k} {v:.3f}" for k, v in held_out_metrics(result).items()) or "no held-out evaluation"
    return f"MLM acc {last['mlm_accuracy']:.3f}, NSP loss {last['nsp_loss']:.3f} (last log step); {held_out}"


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
    spread = f" ± {statistics.stdev(accuracies):.3f}" if len(accuracies) > 1 else ""
    return f"{statistics.mean(accuracies):.3f}{spread}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", nargs="+", default=["50:0.01", "150:0.001"], help="STEPS:LR pretraining runs")
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--pretrain-config",
        default=str(REPO / "ds_configs" / "tiny_cpu.json"),
        help="DeepSpeed JSON of the pretraining runs",
    )
    p.add_argument("--pretrain-batch", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (also of the random init)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-len", type=int, default=128, help="fine-tuning max_len")
    p.add_argument("--max-pairs", type=int, help="fine-tune and score on seeded subsets of this many pairs")
    p.add_argument("--wikitext-dir", default=str(REPO.parent / "shared" / "data" / "wikitext-2"))
    p.add_argument("--snli-dir", default=str(REPO.parent / "shared" / "data" / "snli"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "bench_finetune_snli"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_args, data_name, real_snli = nli_data(args, work)
    rows = []
    for spec in args.pretrain:
        steps, lr = spec.split(":")
        name = f"{args.model}_{steps}_{lr}"
        pretrained = work / f"pretrain_{name}"
        pretrain_s = run(
            [
                sys.executable,
                "launcher/pretrain.py",
                "--data-dir",
                args.wikitext_dir,
                "--model",
                args.model,
                "--deepspeed_config",
                args.pretrain_config,
                "--batch-size",
                str(args.pretrain_batch),
                "--output-dir",
                str(pretrained),
                "--max-steps",
                steps,
                "--lr",
                lr,
                "--no-wandb",
                "--overwrite",
            ],
            work / f"pretrain_{name}.log",
        )
        accuracy = {"pretrained": [], "random init": []}
        for seed in args.seeds:
            random_init = random_init_like(pretrained, work / f"random_{name}_{seed}", seed)
            for kind, checkpoint in (("pretrained", pretrained), ("random init", random_init)):
                tag = kind.replace(" ", "_")
                accuracy[kind].append(finetune(args, data_args, checkpoint, work / f"ft_{tag}_{name}_{seed}", seed))
        rows.append((steps, lr, pretrain_s, pretraining_figures(pretrained), accuracy))

    print(
        f"data: {data_name}; fine-tuning {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, max_len "
        f"{args.max_len}, seeds {args.seeds}; pretraining {args.model}, batch {args.pretrain_batch}, "
        f"{Path(args.pretrain_config).name}"
    )
    print("| pretraining | pretrain s | pretrained model | test acc, pretrained | test acc, random init | gain |")
    print("|---|---|---|---|---|---|")
    for steps, lr, pretrain_s, figures, accuracy in rows:
        gain = statistics.mean(accuracy["pretrained"]) - statistics.mean(accuracy["random init"])
        print(
            f"| {steps} steps, lr {lr} | {pretrain_s:.0f} | {figures} | {summary(accuracy['pretrained'])} "
            f"| {summary(accuracy['random init'])} | {100 * gain:+.1f} points |"
        )
    if real_snli:
        print(
            f"d2l (bert.small pretrained on WikiText-2, 5 epochs on full SNLI train, 2 GPUs): test accuracy "
            f"{D2L_SNLI_TEST_ACCURACY}"
            + ("" if "train ->" in data_name else "; not comparable: here only the 9,842 dev pairs train the model")
        )


if __name__ == "__main__":
    main()
