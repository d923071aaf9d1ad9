"""Time to quality: bertds against Hugging Face's Trainer, same machine, same data, same wall-clock budget.

    python bench/time_to_quality.py [--data-dir ../shared/data/wikitext-2] [--budget-s 400] [--model small]
    python bench/time_to_quality.py --equal-steps 60      # the fairness check: same math, same steps

Both sides train the same BERT shape on the same examples (``launcher/prepare_data.py``: WordPiece, ``--recipe
bert``, max_len 128, the same pairs and tokens), one after the other, for ``--budget-s`` training seconds each, in
the same precision: bf16 where the CPU has it (AVX-512 BF16), fp32 elsewhere or with ``--fp32``:

- bertds: ``launcher/pretrain.py`` with its small-budget recipe, ``ds_configs/small_budget_bf16.json`` (DeepSpeed's
  bf16: bf16 weights and activations, fp32 master weights in the optimizer) or ``ds_configs/small_budget.json`` in
  fp32, plus ``BERTDS_FLAGS``, masks at ``BERTDS_MASK_PROB``;
- Hugging Face: ``transformers.BertForPreTraining`` + ``transformers.Trainer`` (its AdamW, linear warmup and decay,
  dataloader and loop) with ``HF_SETTINGS``, in bf16 mixed precision as Hugging Face's CPU training guide recommends
  (``bf16=True, use_cpu=True``: bf16 autocast over fp32 weights) or in fp32; the labels in its conventions (-100
  where nothing is predicted, ``next_sentence_label`` 0 = "B continues A"), masks at 15% (BERT's and its data
  collator's default).

Each side first times a few steps to size its run to the budget (its schedule decays over the steps it can do),
then trains; both are scored by ``bertds.evaluate.score`` on the same held-out examples (WikiText-2 validation,
masks at 15%) during the run (bertds ``--bertds-evals`` times, Hugging Face ``--evals`` times), the evaluation
time left out of the budget on both sides. Printed: the two curves (held-out MLM accuracy against training seconds)
and the headline: the time bertds needs to reach Hugging Face's final held-out MLM accuracy (and loss), as a
fraction of Hugging Face's training time.

``--equal-steps N`` checks that the comparison is fair instead: both sides train N steps with the same math
(post-LN, NSP, masks at 15%, the same precision, ``HF_SETTINGS`` and the same schedule on both) and are printed at
equal steps, where the same held-out loss is expected up to the noise of data order and dropout (the accuracy too,
once past the frequent-token regime, where it is the share of whichever token the model predicts everywhere).
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
from bertds.errors import run_cli
from bertds.evaluate import HELDOUT_PREFIX, score
from bertds.model import BertForPreTraining, get_config

BERTDS_RECIPE = {
    "fp32": REPO / "ds_configs" / "small_budget.json",
    "bf16": REPO / "ds_configs" / "small_budget_bf16.json",
}
BERTDS_FLAGS: tuple[str, ...] = ()  # post-LN, NSP, dropout 0.1: ahead of pre-LN/MLM-only/no dropout here
BERTDS_MASK_PROB = 0.15  # 0.3 costs 1.44x per step at this shape (the MLM head dominates) for less than it gains
# Hugging Face's side: AdamW with RoBERTa's betas/eps, linear warmup then decay to 0, clipping 1.0, no decay on
# biases and LayerNorm (the Trainer's default grouping); the batch of bertds' recipe. Post-LN BERT at lr 1e-3.
HF_SETTINGS = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=20, max_grad_norm=1.0)
CALIBRATION_STEPS = 3  # the first step also warms up; the others are timed
SCORED = ("step", "train_seconds", "mlm_accuracy", "mlm_loss")


def prepare(args, out: Path, mask_prob: float = 0.15) -> Path:
    if not (out / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "launcher" / "prepare_data.py"),
                "--data-dir",
                args.data_dir,
                "--tokenizer",
                "wordpiece",
                "--recipe",
                "bert",
                "--max-len",
                str(args.max_len),
                "--mask-prob",
                str(mask_prob),
                "--seed",
                str(args.seed),
                "--out",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


def check_same_examples(first: Path, second: Path) -> None:
    """The two prepared directories hold the same pairs (tokenizer, count, held-out tokens); only masks differ."""
    a, b = load_prepared(first), load_prepared(second)
    heldout = [
        load_prepared(p / f"{HELDOUT_PREFIX}validation").examples.with_format("numpy")[:50]["tokens"]
        for p in (first, second)
    ]
    if (
        a.vocab.fingerprint() != b.vocab.fingerprint()
        or len(a.examples) != len(b.examples)
        or not np.array_equal(*heldout)
    ):
        raise SystemExit(f"error: {first} and {second} do not hold the same examples; prepare both again")


# --- bertds -----------------------------------------------------------------------------------------------------


def run_bertds(
    args, prepared: Path, recipe: Path, flags, out: Path, steps: int, eval_interval: int, eval_examples: int
) -> list[dict]:
    command = [
        sys.executable,
        str(REPO / "launcher" / "pretrain.py"),
        "--prepared",
        str(prepared),
        "--max-len",
        str(args.max_len),
        "--model",
        args.model,
        "--deepspeed_config",
        str(recipe),
        *flags,
        "--max-steps",
        str(steps),
        "--eval-interval",
        str(eval_interval),
        "--eval-examples",
        str(eval_examples),
        "--log-interval",
        "1",
        "--output-dir",
        str(out),
        "--overwrite",
        "--no-wandb",
        "--seed",
        str(args.seed),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return read_metrics(out, None)


def bertds_seconds_per_step(args, prepared: Path, recipe: Path, flags, workdir: Path) -> float:
    records = [
        r
        for r in run_bertds(args, prepared, recipe, flags, workdir / "bertds-calibration", CALIBRATION_STEPS, 0, 1)
        if "split" not in r
    ]
    batch = json.loads(recipe.read_text())["train_batch_size"]
    return float(np.median([batch / r["pairs_per_s"] for r in records[1:]]))


def hf_settings_as_ds_config(batch: int, bf16: bool, workdir: Path) -> Path:
    """``HF_SETTINGS`` as a DeepSpeed JSON, for bertds' side of the equal-steps check."""
    s = HF_SETTINGS
    config = {
        "train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": s["lr"], "betas": list(s["betas"]), "eps": s["eps"], "weight_decay": s["weight_decay"]},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0.0, "warmup_type": "linear", "warmup_num_steps": s["warmup_steps"]},
        },
        "gradient_clipping": s["max_grad_norm"],
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    path = workdir / "hf_settings.json"
    path.write_text(json.dumps(config))
    return path


def scored(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in SCORED} for r in records if r.get("split") == "validation"]


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


def cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def run_hf(args, prepared: Path, heldout, steps: int, eval_interval: int, workdir: Path, bf16: bool) -> list[dict]:
    import transformers

    from bertds.hf import from_hf_state_dict, to_hf_config

    data = load_prepared(prepared)
    config = get_config(args.model, vocab_size=len(data.vocab), pad_token_id=data.vocab.pad_id)
    s = HF_SETTINGS
    transformers.set_seed(args.seed)
    model = transformers.BertForPreTraining(to_hf_config(config))
    training_args = transformers.TrainingArguments(
        output_dir=str(workdir / "hf"),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=s["lr"],
        adam_beta1=s["betas"][0],
        adam_beta2=s["betas"][1],
        adam_epsilon=s["eps"],
        weight_decay=s["weight_decay"],
        lr_scheduler_type="linear",
        warmup_steps=s["warmup_steps"],
        max_grad_norm=s["max_grad_norm"],
        bf16=bf16,
        seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_drop_last=True,
        use_cpu=True,
    )
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
            metrics = score(bertds_model, heldout, args.batch_size, torch.device("cpu"))
            curve.append({"step": state.global_step, "train_seconds": seconds, **metrics})
            self.eval_time += time.perf_counter() - began

    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=HFExamples(data.examples), callbacks=[HeldOut()]
    )
    trainer.train()
    return [{k: c[k] for k in SCORED} for c in curve]


def hf_seconds_per_step(args, prepared: Path, heldout, workdir: Path, bf16: bool) -> float:
    curve = run_hf(args, prepared, heldout.select(range(1)), CALIBRATION_STEPS, 1, workdir, bf16)
    seconds = np.diff([0.0] + [c["train_seconds"] for c in curve])
    return float(np.median(seconds[1:]))


# --- report -----------------------------------------------------------------------------------------------------


def time_to_reach(curve: list[dict], target: float, metric: str = "mlm_accuracy") -> float | None:
    """Training seconds at which the curve first reaches ``target`` (linear between evaluations): an accuracy at
    or above it, a loss at or below it."""
    sign = -1.0 if metric.endswith("loss") else 1.0
    previous = {"train_seconds": 0.0, metric: curve[0][metric] if sign < 0 else 0.0}
    for point in curve:
        if sign * point[metric] >= sign * target:
            gain = sign * (point[metric] - previous[metric])
            share = sign * (target - previous[metric]) / gain if gain > 0 else 1.0
            return previous["train_seconds"] + share * (point["train_seconds"] - previous["train_seconds"])
        previous = point
    return None


def print_curve(name: str, curve: list[dict]) -> None:
    print(f"\n{name}: held-out MLM accuracy against training seconds")
    print(f"{'step':>6} {'seconds':>8} {'mlm acc':>8} {'mlm loss':>9}")
    for p in curve:
        print(f"{p['step']:>6} {p['train_seconds']:>8.1f} {p['mlm_accuracy']:>8.4f} {p['mlm_loss']:>9.3f}")


def report_budget(bertds_curve: list[dict], hf_curve: list[dict], budget: float) -> None:
    print_curve("bertds", bertds_curve)
    print_curve("Hugging Face", hf_curve)
    hf_final, final, hf_seconds = hf_curve[-1], bertds_curve[-1], hf_curve[-1]["train_seconds"]
    print(
        f"\nHugging Face: {hf_final['step']} steps in {hf_seconds:.0f} s (budget {budget:.0f} s), final held-out MLM "
        f"accuracy {hf_final['mlm_accuracy']:.4f}, loss {hf_final['mlm_loss']:.3f}; bertds: {final['step']} steps in "
        f"{final['train_seconds']:.0f} s, final accuracy {final['mlm_accuracy']:.4f}, loss {final['mlm_loss']:.3f}"
    )
    # The loss too: in the frequent-token regime the accuracy is the share of one token ("the": 0.068 here).
    for metric, name in (("mlm_accuracy", "accuracy"), ("mlm_loss", "loss")):
        reached = time_to_reach(bertds_curve, hf_final[metric], metric)
        if reached is None:
            print(f"bertds did not reach Hugging Face's final held-out MLM {name} within its budget")
        else:
            print(
                f"bertds reaches Hugging Face's final held-out MLM {name} after {reached:.0f} s: "
                f"{reached / hf_seconds:.3f} of Hugging Face's training time "
                f"(1/{hf_seconds / max(reached, 1e-9):.1f})"
            )


def report_equal_steps(bertds_curve: list[dict], hf_curve: list[dict], precision: str) -> None:
    by_step = {p["step"]: p for p in bertds_curve}
    print(f"\nat equal steps, same math (post-LN, NSP, masks at 15%, {precision}, the same optimizer and schedule)")
    print(
        f"{'step':>6} {'HF acc':>8} {'bertds acc':>10} {'HF loss':>8} {'bertds loss':>11} {'HF s':>7} {'bertds s':>9}"
    )
    for p in hf_curve:
        if p["step"] in by_step:
            b = by_step[p["step"]]
            print(
                f"{p['step']:>6} {p['mlm_accuracy']:>8.4f} {b['mlm_accuracy']:>10.4f} {p['mlm_loss']:>8.3f} "
                f"{b['mlm_loss']:>11.3f} {p['train_seconds']:>7.1f} {b['train_seconds']:>9.1f}"
            )


# --- the two modes ----------------------------------------------------------------------------------------------


def precision(args) -> str:
    """Both sides' precision: bf16 where the CPU has it (Hugging Face's CPU guide recommends it), else fp32."""
    return "bf16" if cpu_has_bf16() and not args.fp32 else "fp32"


def equal_steps(args, prepared: Path, heldout, workdir: Path) -> None:
    interval, mode = max(1, args.equal_steps // args.evals), precision(args)
    bf16 = mode == "bf16"
    recipe = hf_settings_as_ds_config(args.batch_size, bf16, workdir)
    bertds_curve = scored(
        run_bertds(args, prepared, recipe, (), workdir / "bertds", args.equal_steps, interval, len(heldout))
    )
    hf_curve = run_hf(args, prepared, heldout, args.equal_steps, interval, workdir, bf16)
    report_equal_steps(bertds_curve, hf_curve, mode)


def same_budget(args, prepared: Path, heldout, workdir: Path) -> None:
    bertds_prepared = prepared
    if BERTDS_MASK_PROB != 0.15:
        bertds_prepared = prepare(args, workdir / f"prepared-mask{BERTDS_MASK_PROB}", BERTDS_MASK_PROB)
        check_same_examples(prepared, bertds_prepared)
    mode = precision(args)
    recipe, bf16 = BERTDS_RECIPE[mode], mode == "bf16"
    bertds_step = bertds_seconds_per_step(args, bertds_prepared, recipe, BERTDS_FLAGS, workdir)
    hf_step = hf_seconds_per_step(args, prepared, heldout, workdir, bf16)
    bertds_steps, hf_steps = max(1, int(args.budget_s / bertds_step)), max(1, int(args.budget_s / hf_step))
    # bertds is evaluated more often: the headline is where its curve crosses Hugging Face's final accuracy.
    hf_interval = max(1, round(hf_steps / args.evals))
    bertds_interval = max(1, round(bertds_steps / args.bertds_evals))
    print(
        f"calibration: bertds ({recipe.name}) {bertds_step:.2f} s/step -> {bertds_steps} steps, evaluated every "
        f"{bertds_interval}; Hugging Face ({'bf16 mixed precision' if bf16 else 'fp32'}) {hf_step:.2f} s/step -> "
        f"{hf_steps} steps, evaluated every {hf_interval}; {len(heldout)} held-out examples",
        flush=True,
    )
    bertds_curve = scored(
        run_bertds(
            args,
            bertds_prepared,
            recipe,
            BERTDS_FLAGS,
            workdir / "bertds",
            bertds_steps,
            bertds_interval,
            len(heldout),
        )
    )
    hf_curve = run_hf(args, prepared, heldout, hf_steps, hf_interval, workdir, bf16)
    report_budget(bertds_curve, hf_curve, args.budget_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "wikitext-2"))
    p.add_argument(
        "--prepared",
        help="a directory of launcher/prepare_data.py (WordPiece, bert recipe, masks at 15%%, this --seed) to reuse",
    )
    p.add_argument("--budget-s", type=float, default=400, help="training seconds per side (evaluation excluded)")
    p.add_argument(
        "--equal-steps",
        type=int,
        default=0,
        help="instead of a budget: both sides N steps with the same math, printed at equal steps",
    )
    p.add_argument("--model", default="small")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument(
        "--batch-size",
        type=int,
        default=json.loads(BERTDS_RECIPE["fp32"].read_text())["train_batch_size"],
        help="Hugging Face's batch (and both sides' with --equal-steps); default: bertds' recipe's",
    )
    p.add_argument("--fp32", action="store_true", help="both sides in fp32 even where the CPU has bf16")
    p.add_argument("--eval-examples", type=int, default=300, help="held-out examples scored at each evaluation")
    p.add_argument(
        "--evals", type=int, default=6, help="evaluations of the Hugging Face run (and of both with --equal-steps)"
    )
    p.add_argument("--bertds-evals", type=int, default=50, help="evaluations of the bertds run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as tmp:
        workdir = Path(tmp)
        prepared = Path(args.prepared) if args.prepared else prepare(args, workdir / "prepared")
        heldout = load_prepared(prepared / f"{HELDOUT_PREFIX}validation").examples
        heldout = heldout.select(range(min(args.eval_examples, len(heldout))))
        if args.equal_steps:
            equal_steps(args, prepared, heldout, workdir)
        else:
            same_budget(args, prepared, heldout, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
