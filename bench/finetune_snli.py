"""Pretrain ``tiny`` on WikiText-2, then fine-tune it on SNLI and report test accuracy (not a test).

    python bench/finetune_snli.py                                   # d2l's 50 steps, then a longer run
    python bench/finetune_snli.py --pretrain 50:0.01 200:0.001 --epochs 5

Each ``STEPS:LR`` pretrains a fresh model (global batch 512, max_len 64) and fine-tunes it. The data is real SNLI
where a copy is at hand (``--snli-dir``, default ../shared/data/snli): its train split when present, else dev as the
training set with test held out; without a copy, the synthetic WikiText-2 pair task, named as such. d2l's SNLI test
accuracy, 0.786 (bert.small, 5 epochs on full SNLI, 2 GPUs), is printed beside the figures only for real SNLI.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
D2L_SNLI_TEST_ACCURACY = 0.786


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as f:
        if subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"failed: {' '.join(command)} (see {log})")


def nli_data(args, work: Path) -> tuple[list[str], str, bool]:
    snli = Path(args.snli_dir)
    from bertds.tasks.nli import split_files
    if any(p.is_file() for p in split_files(snli, "train")):
        return ["--data-dir", str(snli), "--eval-splits", "dev", "test"], "SNLI train -> dev/test", True
    if any(p.is_file() for p in split_files(snli, "test")):
        return (["--data-dir", str(snli), "--train-split", "dev", "--eval-splits", "test"],
                "SNLI dev (9,842 pairs; no train split at hand) -> test", True)
    from bertds.tasks.synthetic import write_synthetic_snli
    directory = write_synthetic_snli(args.wikitext_dir, work / "synthetic", {"train": 10000, "test": 10000})
    return (["--data-dir", str(directory), "--train-split", "train", "--eval-splits", "test"],
            "synthetic WikiText-2 pair task (NOT SNLI)", False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", nargs="+", default=["50:0.01", "150:0.001"], help="STEPS:LR pretraining runs")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
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
        pretrained, finetuned = work / f"pretrain_{steps}_{lr}", work / f"finetune_{steps}_{lr}"
        start = time.perf_counter()
        run([sys.executable, "launcher/pretrain.py", "--data-dir", args.wikitext_dir, "--output-dir",
             str(pretrained), "--max-steps", steps, "--lr", lr, "--no-wandb", "--overwrite"],
            work / f"pretrain_{steps}_{lr}.log")
        pretrain_s = time.perf_counter() - start
        mlm_nsp = json.loads((pretrained / "train_config.json").read_text())["result"]
        start = time.perf_counter()
        run([sys.executable, "launcher/finetune_snli.py", "--checkpoint", str(pretrained), *data_args,
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--output-dir", str(finetuned)], work / f"finetune_{steps}_{lr}.log")
        result = json.loads((finetuned / "finetune_config.json").read_text())["result"]
        rows.append((steps, lr, mlm_nsp, pretrain_s, result, time.perf_counter() - start))

    print(f"data: {data_name}; fine-tuning {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, max_len 128")
    print("| pretraining | MLM / NSP loss | pretrain s | fine-tune s | train acc | test acc (last epoch) |")
    print("|---|---|---|---|---|---|")
    for steps, lr, mlm_nsp, pretrain_s, result, finetune_s in rows:
        final = result["final"]
        print(f"| {steps} steps, lr {lr} | {mlm_nsp['mlm_loss']:.3f} / {mlm_nsp['nsp_loss']:.3f} | {pretrain_s:.0f} "
              f"| {finetune_s:.0f} | {final['train_acc']:.3f} | {final['test_acc']:.3f} |")
    if real_snli:
        print(f"d2l (bert.small pretrained on WikiText-2, 5 epochs on full SNLI train, 2 GPUs): test accuracy "
              f"{D2L_SNLI_TEST_ACCURACY}" + ("" if "train ->" in data_name else
                                             "; not comparable: here only the 9,842 dev pairs train the model"))


if __name__ == "__main__":
    main()
