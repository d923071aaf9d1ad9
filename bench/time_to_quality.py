"""Time to quality: bertds against Hugging Face's Trainer, same machine, same data, same wall-clock budget.

    python bench/time_to_quality.py --data-dir ../shared/data/wikitext-2 [--budget-s 600] [--model small]

Both sides train the same BERT shape on the same prepared examples (``launcher/prepare_data.py``: WordPiece,
``--recipe bert``, max_len 128) with the same optimizer settings (``ds_configs/small_budget.json``: AdamW, linear
warmup and decay, clipping 1.0, no decay on bias/LayerNorm), one after the other:

- bertds: ``launcher/pretrain.py --prepared DIR --deepspeed_config ds_configs/small_budget.json``;
- Hugging Face: ``transformers.BertForPreTraining`` + ``transformers.Trainer`` (its own AdamW, schedule, dataloader
  and loop), the labels in its conventions (-100 where nothing is predicted, ``next_sentence_label`` 0 = "B
  continues A").

Each side first times a few steps to size its run to the budget (the schedule decays over the steps it can do), then
trains; both are scored by ``bertds.evaluate.score`` on the same held-out examples (WikiText-2 validation, masks at
15%) every ``E`` steps, the evaluation time left out of the budget on both sides. Printed: the two curves (held-out
MLM accuracy against training seconds), both at equal steps (same math should give the same accuracy), and the
headline: the time bertds needs to reach Hugging Face's final held-out MLM accuracy, as a fraction of its budget.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bertds.data import load_prepared
from bertds.engine.tracking import read_metrics
from bertds.evaluate import HELDOUT_PREFIX, score
from bertds.model import BertForPreTraining, get_config

RECIPE = REPO / "ds_configs" / "small_budget.json"
CALIBRATION_STEPS = 3  # the first step also warms up; the others are timed


def prepare(args, workdir: Path) -> Path:
    out = Path(args.prepared) if args.prepared else workdir / "prepared"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, str(REPO / "launcher" / "prepare_data.py"), "--data-dir", args.data_dir,
                        "--tokenizer", "wordpiece", "--recipe", "bert", "--max-len", str(args.max_len),
                        "--out", str(out)], check=True)
    return out


# --- bertds -----------------------------------------------------------------------------------------------------

def run_bertds(args, prepared: Path, out: Path, steps: int, eval_interval: int, eval_examples: int) -> list[dict]:
    command = [sys.executable, str(REPO / "launcher" / "pretrain.py"), "--prepared", str(prepared),
               "--max-len", str(args.max_len), "--model", args.model, "--deepspeed_config", str(RECIPE),
               "--max-steps", str(steps), "--eval-interval", str(eval_interval), "--eval-examples",
               str(eval_examples), "--log-interval", "1", "--output-dir", str(out), "--overwrite",
               "--no-wandb", "--seed", str(args.seed)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return read_metrics(out, None)


def bertds_seconds_per_step(args, prepared: Path, workdir: Path) -> float:
    records = [r for r in run_bertds(args, prepared, workdir / "bertds-calibration", CALIBRATION_STEPS, 0, 1)
               if "split" not in r]
    batch = json.loads(RECIPE.read_text())["train_batch_size"]
    return float(np.median([batch / r["pairs_per_s"] for r in records[1:]]))


# --- Hugging Face -----------------------------------------------------------------------------------------------

class HFExamples(torch.utils.data.Dataset):
    """The prepared examples in Hugging Face's conventions."""

    def __init__(self, examples):
        columns = examples.with_format("numpy")[:]
        tokens, valid_len = columns["tokens"].astype(np.int64), columns["valid_len"]
        labels = np.full_like(tokens, -100)
        rows, slots = np.nonzero(columns["mlm_weights"] > 0)
        labels[rows, columns["pred_positions"][rows, slots]] = columns["mlm_labels"][rows, slots]
        self.columns = {
            "input_ids": torch.from_numpy(tokens),
            "token_type_ids": torch.from_numpy(columns["segments"].astype(np.int64)),
            "attention_mask": torch.from_numpy((np.arange(tokens.shape[1]) < valid_len[:, None]).astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(1 - columns["nsp_label"].astype(np.int64)),  # HF: 0 = follows
        }

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


def run_hf(args, prepared: Path, heldout, steps: int, eval_interval: int, workdir: Path) -> list[dict]:
    import transformers

    from bertds.hf import from_hf_state_dict, to_hf_config
    data = load_prepared(prepared)
    config = get_config(args.model, vocab_size=len(data.vocab), pad_token_id=data.vocab.pad_id)
    recipe = json.loads(RECIPE.read_text())
    optimizer, schedule = recipe["optimizer"]["params"], recipe["scheduler"]["params"]
    transformers.set_seed(args.seed)
    model = transformers.BertForPreTraining(to_hf_config(config))
    training_args = transformers.TrainingArguments(
        output_dir=str(workdir / "hf"), max_steps=steps, per_device_train_batch_size=recipe["train_batch_size"],
        learning_rate=optimizer["lr"], adam_beta1=optimizer["betas"][0], adam_beta2=optimizer["betas"][1],
        adam_epsilon=optimizer["eps"], weight_decay=optimizer["weight_decay"], lr_scheduler_type="linear",
        warmup_steps=schedule["warmup_num_steps"], max_grad_norm=recipe["gradient_clipping"], seed=args.seed,
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10 ** 9, disable_tqdm=True,
        dataloader_drop_last=True, use_cpu=True)
    curve: list[dict] = []

    class HeldOut(transformers.TrainerCallback):
        """Scores the model with bertds' evaluation every eval_interval steps, outside the training clock."""

        def on_train_begin(self, *_, **__):
            self.start, self.eval_time = time.perf_counter(), 0.0

        def on_step_end(self, _args, state, control, model=None, **__):
            if state.global_step % eval_interval and state.global_step != steps:
                return
            seconds = time.perf_counter() - self.start - self.eval_time
            began = time.perf_counter()
            bertds_model = BertForPreTraining(config)
            bertds_model.load_state_dict(from_hf_state_dict(model.state_dict(), config, "hf"))
            metrics = score(bertds_model, heldout, recipe["train_batch_size"], torch.device("cpu"))
            curve.append({"step": state.global_step, "train_seconds": seconds, **metrics})
            self.eval_time += time.perf_counter() - began

    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=HFExamples(data.examples),
                                   callbacks=[HeldOut()])
    trainer.train()
    return curve


def hf_seconds_per_step(args, prepared: Path, heldout, workdir: Path) -> float:
    curve = run_hf(args, prepared, heldout.select(range(1)), CALIBRATION_STEPS, 1, workdir)
    seconds = np.diff([0.0] + [c["train_seconds"] for c in curve])
    return float(np.median(seconds[1:]))


# --- report -----------------------------------------------------------------------------------------------------

def time_to_reach(curve: list[dict], accuracy: float) -> float | None:
    """Training seconds at which the curve first reaches ``accuracy`` (linear between evaluations)."""
    previous = {"train_seconds": 0.0, "mlm_accuracy": 0.0}
    for point in curve:
        if point["mlm_accuracy"] >= accuracy:
            gain = point["mlm_accuracy"] - previous["mlm_accuracy"]
            share = (accuracy - previous["mlm_accuracy"]) / gain if gain > 0 else 1.0
            return previous["train_seconds"] + share * (point["train_seconds"] - previous["train_seconds"])
        previous = point
    return None


def report(bertds_curve: list[dict], hf_curve: list[dict], budget: float) -> None:
    for name, curve in (("bertds", bertds_curve), ("Hugging Face", hf_curve)):
        print(f"\n{name}: held-out MLM accuracy against training seconds")
        print(f"{'step':>6} {'seconds':>8} {'mlm acc':>8} {'mlm loss':>9} {'nsp acc':>8}")
        for p in curve:
            print(f"{p['step']:>6} {p['train_seconds']:>8.1f} {p['mlm_accuracy']:>8.4f} {p['mlm_loss']:>9.3f} "
                  f"{p['nsp_accuracy']:>8.3f}")
    by_step = {p["step"]: p for p in bertds_curve}
    print("\nat equal steps (same math: same accuracy expected)")
    print(f"{'step':>6} {'HF acc':>8} {'bertds acc':>10} {'HF loss':>8} {'bertds loss':>11}")
    for p in hf_curve:
        if p["step"] in by_step:
            b = by_step[p["step"]]
            print(f"{p['step']:>6} {p['mlm_accuracy']:>8.4f} {b['mlm_accuracy']:>10.4f} {p['mlm_loss']:>8.3f} "
                  f"{b['mlm_loss']:>11.3f}")
    target, hf_seconds = hf_curve[-1]["mlm_accuracy"], hf_curve[-1]["train_seconds"]
    reached = time_to_reach(bertds_curve, target)
    final = bertds_curve[-1]
    print(f"\nHugging Face: {hf_curve[-1]['step']} steps in {hf_seconds:.0f} s (budget {budget:.0f} s), final held-out "
          f"MLM accuracy {target:.4f}; bertds: {final['step']} steps, final {final['mlm_accuracy']:.4f}")
    if reached is None:
        print("bertds did not reach Hugging Face's final held-out MLM accuracy within its budget")
    else:
        print(f"bertds reaches Hugging Face's final held-out MLM accuracy after {reached:.0f} s: "
              f"{reached / hf_seconds:.3f} of Hugging Face's budget (1/{hf_seconds / reached:.1f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "wikitext-2"))
    p.add_argument("--prepared", help="a directory of launcher/prepare_data.py (WordPiece, bert recipe) to reuse")
    p.add_argument("--budget-s", type=float, default=600, help="training seconds per side (evaluation excluded)")
    p.add_argument("--model", default="small")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=300, help="held-out examples scored at each evaluation")
    p.add_argument("--evals", type=int, default=6, help="evaluations of the Hugging Face run (bertds: same steps)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as tmp:
        workdir = Path(tmp)
        prepared = prepare(args, workdir)
        heldout = load_prepared(prepared / f"{HELDOUT_PREFIX}validation").examples
        heldout = heldout.select(range(min(args.eval_examples, len(heldout))))
        bertds_step, hf_step = bertds_seconds_per_step(args, prepared, workdir), \
            hf_seconds_per_step(args, prepared, heldout, workdir)
        bertds_steps, hf_steps = max(1, int(args.budget_s / bertds_step)), max(1, int(args.budget_s / hf_step))
        interval = max(1, round(hf_steps / args.evals))
        print(f"calibration: bertds {bertds_step:.2f} s/step -> {bertds_steps} steps; Hugging Face {hf_step:.2f} "
              f"s/step -> {hf_steps} steps; evaluation every {interval} steps on {len(heldout)} held-out examples",
              flush=True)
        bertds_curve = [{k: r[k] for k in ("step", "train_seconds", "mlm_accuracy", "mlm_loss", "nsp_accuracy")}
                        for r in run_bertds(args, prepared, workdir / "bertds", bertds_steps, interval,
                                            args.eval_examples)
                        if r.get("split") == "validation"]
        hf_curve = run_hf(args, prepared, heldout, hf_steps, interval, workdir)
    report(bertds_curve, hf_curve, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
