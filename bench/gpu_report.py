"""Every GPU claim of bertds checked in one command: one table (and --json), exit 1 if any check fails.

    python bench/gpu_report.py --data-dir ../shared/data/wikitext-2 --json gpu_report.json
    python bench/gpu_report.py --smoke --json out.json   # the same code paths at toy sizes, on CPU too (CI)

Checks: the default main job's pairs/s (next to the seed's 4,370 on 2 GPUs); BERT-Base seq 128 bf16, BERT-Large
seq 128 fp16 ZeRO-2 and BERT-Large seq 512 bf16 ZeRO-2 + activation checkpointing (sequences/s, tokens/s, TFLOP/s,
MFU against the detected GPU's peak, data wait, peak memory next to ``bertds.plan``'s prediction); fp16 dynamic loss
scaling over a few hundred steps; DeepSpeed's FusedLamb against the PyTorch LAMB fallback; the fused MLM loss
against the logits path in bf16 (loss, gradients, speed); two ranks when there are two devices, else a skip saying so.

The full sizes are planned for one H100 in 8 minutes; set-up (data preparation, engine start, kernel builds) and
the timed steps are reported apart, and a "budget" row fails when the whole report takes longer than --budget-s.
``--smoke`` shrinks every model to ``tiny`` at max_len 64 and a few steps; on CPU it runs the 2-rank path on gloo and
lets DeepSpeed take fp16 (its CPU capability check refuses it) so that loss scaling runs too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.throughput import (
    STEPS,
    BenchConfig,
    Prefetcher,
    achieved,
    build_model,
    ds_config,
    load_batches,
    model_flops,
    split_parameters,
    timed_steps,
)
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.engine.optim import Lamb
from bertds.errors import UserError, run_cli
from bertds.model import BertForPreTraining, get_config
from bertds.plan import PlanConfig, plan

SEED_PAIRS_PER_S = 4370.0  # the seed's PyTorch main job on 2 GPUs (the figure)
# Dense peak TFLOP/s per precision (fp32: TF32 tensor cores), first matching name wins.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
MEMORY_SLACK = 1.25  # measured peak may exceed the plan by this factor (allocator rounding, temporaries)


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    max_len: int
    micro_batch: int
    precision: str
    zero: int
    checkpointing: bool = False
    warmup: int = 3
    steps: int = 20


@dataclass(frozen=True)
class Sizes:
    main_steps: int
    main_batch: int | None  # None: the JSON's 512
    cases: tuple[Case, ...]
    fp16_steps: int
    fp16_case: tuple[str, int, int]  # model, max_len, micro batch
    fp16_scale_power: int  # initial loss scale 2^power: high enough to overflow at first
    mlm_case: tuple[str, int, int]
    mlm_repeats: int
    lamb_shapes: tuple[tuple[int, ...], ...]
    lamb_steps: int
    eval_examples: int  # the main job's held-out evaluation at its end


FULL = Sizes(
    main_steps=300,
    main_batch=None,
    cases=(
        Case("base seq128 bf16", "base", 128, 64, "bf16", 0, steps=30),
        Case("large seq128 fp16 ZeRO-2", "large", 128, 64, "fp16", 2),
        Case("large seq512 bf16 ZeRO-2 + act. ckpt", "large", 512, 16, "bf16", 2, checkpointing=True),
    ),
    fp16_steps=300,
    fp16_case=("small", 128, 64),
    fp16_scale_power=20,
    mlm_case=("base", 128, 64),
    mlm_repeats=10,
    lamb_shapes=((1024, 1024), (4096, 1024), (1024,), (30522, 128)),
    lamb_steps=10,
    eval_examples=1000,
)
SMOKE = Sizes(
    main_steps=2,
    main_batch=16,
    cases=tuple(replace(c, model="tiny", max_len=64, micro_batch=8, warmup=1, steps=2) for c in FULL.cases),
    fp16_steps=8,
    fp16_case=("tiny", 64, 8),
    fp16_scale_power=17,
    mlm_case=("tiny", 64, 8),
    mlm_repeats=1,
    lamb_shapes=((16, 8), (8,)),
    lamb_steps=3,
    eval_examples=8,
)


@dataclass
class Check:
    name: str
    status: str  # pass, fail or skip
    figures: dict = field(default_factory=dict)
    note: str = ""
    setup_s: float = 0.0  # warm-up: data preparation, engine start, kernel builds
    run_s: float = 0.0  # the measured part


def verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def detect_peak(override: float | None) -> dict[str, float] | None:
    if override:
        return {"bf16": override, "fp16": override, "fp32": override}
    if get_accelerator().device_name() != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peaks for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def run_subprocess(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):  # its own process group
        env.pop(key, None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False)


def launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(29500 + os.getpid() % 1000),
    ]


def check_main_job(sizes: Sizes, data_dir: str | None, ranks: int) -> Check:
    """``launcher/pretrain.py`` with its defaults (tiny, d2l recipe, ds_configs/tiny_cpu.json) as a user runs it."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bertds-gpu-report-") as out:
        cmd = [
            *launcher(ranks),
            str(ROOT / "launcher" / "pretrain.py"),
            "--no-wandb",
            "--output-dir",
            out,
            "--max-steps",
            str(sizes.main_steps),
            "--eval-examples",
            str(sizes.eval_examples),
            "--log-interval",
            str(max(1, sizes.main_steps // 3)),
        ]
        cmd += ["--data-dir", data_dir] if data_dir else []
        cmd += ["--batch-size", str(sizes.main_batch)] if sizes.main_batch else []
        proc = run_subprocess(cmd, timeout=300)
    found = re.search(r"^([\d.]+) sentence pairs/sec", proc.stdout, re.MULTILINE)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or found is None:
        return Check(
            "main job (tiny, d2l recipe)",
            "fail",
            {"exit_code": proc.returncode},
            (proc.stderr or proc.stdout).strip().splitlines()[-1:][0] if (proc.stderr or proc.stdout) else "",
            run_s=wall,
        )
    pairs = float(found.group(1))
    return Check(
        "main job (tiny, d2l recipe)",
        "pass",
        {
            "pairs_per_s": pairs,
            "vs_seed_4370_on_2_gpus": pairs / SEED_PAIRS_PER_S,
            "ranks": ranks,
            "steps": sizes.main_steps,
        },
        "pairs/s as the job prints it (data loading included)",
        run_s=wall,
    )


def planned_bytes(case: Case, vocab_size: int) -> float:
    p = plan(
        PlanConfig(
            model=case.model,
            max_len=case.max_len,
            micro_batch=case.micro_batch,
            zero=case.zero,
            precision=case.precision,
            gpus=1,
            gpus_per_node=1,
            vocab_size=vocab_size,
        )
    )
    return p.model_states_bytes + (p.activations_checkpointed_bytes if case.checkpointing else p.activations_bytes)


def engine_config(cfg: BenchConfig, fp16_scale_power: int | None = None) -> dict:
    config = ds_config(cfg)
    if cfg.precision == "fp16" and fp16_scale_power is not None:
        config["fp16"].update(initial_scale_power=fp16_scale_power, loss_scale_window=50, hysteresis=1)
    return config


def build_engine(cfg: BenchConfig, checkpointing: bool = False, fp16_scale_power: int | None = None):
    data, batches = load_batches(cfg, 0, 1)
    model = build_model(cfg, len(data.vocab), data.vocab.pad_id)
    model.set_activation_checkpointing(checkpointing)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=engine_config(cfg, fp16_scale_power)
    )
    return data, batches, model, engine


def check_throughput(case: Case, data_dir: str | None, peaks: dict[str, float] | None) -> Check:
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    cfg = BenchConfig(
        model=case.model,
        max_len=case.max_len,
        micro_batch=case.micro_batch,
        zero=case.zero,
        precision=case.precision,
        warmup=case.warmup,
        steps=case.steps,
        log_interval=case.steps,
        data_dir=data_dir,
    )
    start = time.perf_counter()
    data, batches, model, engine = build_engine(cfg, case.checkpointing)
    accelerator.empty_cache()
    accelerator.reset_peak_memory_stats()
    setup = time.perf_counter() - start
    prefetch = Prefetcher(iter(batches), device)
    timed = timed_steps(cfg, engine, STEPS["fused"], prefetch)
    peak_bytes = accelerator.max_memory_allocated()
    per_token, per_slot = split_parameters(model)
    tokens = case.micro_batch * case.max_len * case.steps
    flops = model_flops(model.config, per_token, per_slot, tokens, int(timed.slots), case.max_len)
    peak_tflops = peaks.get(case.precision) if peaks else None
    tflops, mfu = achieved(flops / timed.elapsed, peak_tflops)
    predicted = planned_bytes(case, len(data.vocab))
    losses = [x for _, mlm, nsp in timed.logged for x in (mlm, nsp)]
    figures = {
        "sequences_per_s": case.micro_batch * case.steps / timed.elapsed,
        "tokens_per_s": tokens / timed.elapsed,
        "tflops": tflops / 1e3,
        "mfu_pct": mfu,
        "data_wait_pct": 100 * prefetch.wait_s / timed.elapsed,
        "peak_memory_gib": peak_bytes / 2**30,
        "planned_memory_gib": predicted / 2**30,
        "final_losses": losses,
    }
    ok = all(math.isfinite(x) for x in losses)
    note = "warm-up setup includes data preparation and engine start"
    if device.type == "cuda":
        ok = ok and peak_bytes <= MEMORY_SLACK * predicted
        note += f"; peak memory must stay within {MEMORY_SLACK}× the plan"
    else:
        note += "; peak memory on CPU is the process RSS (not comparable with the plan)"
    destroy(engine)
    return Check(case.name, verdict(ok), figures, note, setup, timed.elapsed)


def destroy(engine) -> None:
    engine.destroy()
    get_accelerator().empty_cache()


def check_fp16_scaling(sizes: Sizes, data_dir: str | None) -> Check:
    """fp16 ZeRO-2 from a high loss scale: overflows must be skipped and counted, the scale must halve, settle
    and never go NaN, and the loss must fall."""
    model, max_len, micro_batch = sizes.fp16_case
    cfg = BenchConfig(
        model=model, max_len=max_len, micro_batch=micro_batch, zero=2, precision="fp16", lr=1e-3, data_dir=data_dir
    )
    start = time.perf_counter()
    _, batches, _, engine = build_engine(cfg, fp16_scale_power=sizes.fp16_scale_power)
    setup = time.perf_counter() - start
    device = torch.device(get_accelerator().current_device_name())
    prefetch, losses, scales = Prefetcher(iter(batches), device), [], []
    for _ in range(sizes.fp16_steps):
        out = STEPS["fused"](engine, prefetch.next())
        losses.append(out.loss.detach().float())
        scales.append(float(engine.optimizer.loss_scale))
    losses_t = torch.stack(losses).cpu()
    skipped = engine.skipped_steps
    window = max(1, len(losses) // 5)
    first, last = losses_t[:window].mean().item(), losses_t[-window:].mean().item()
    figures = {
        "steps": sizes.fp16_steps,
        "skipped_steps": skipped,
        "initial_scale": 2.0**sizes.fp16_scale_power,
        "final_scale": scales[-1],
        "min_scale": min(scales),
        "first_loss": first,
        "last_loss": last,
    }
    ok = (
        bool(torch.isfinite(losses_t).all())
        and 0 < skipped < sizes.fp16_steps // 2
        and 1 <= scales[-1] < 2.0**sizes.fp16_scale_power
        and last < first
    )
    run = time.perf_counter() - start - setup
    destroy(engine)
    return Check(
        "fp16 dynamic loss scaling (ZeRO-2)",
        verdict(ok),
        figures,
        "pass: finite losses, 0 < skipped < half the steps, scale halved and >= 1, loss falls",
        setup,
        run,
    )


def lamb_updates(make_optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    weights = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = make_optimizer(weights)
    for step_grads in grads:
        for w, g in zip(weights, step_grads):
            w.grad = g.clone()
        optimizer.step()
    return [w.detach() for w in weights]


def check_lamb(sizes: Sizes) -> Check:
    """DeepSpeed's FusedLamb and bertds' PyTorch LAMB from the same weights on the same gradients."""
    device = torch.device(get_accelerator().current_device_name())
    gen = torch.Generator().manual_seed(0)
    shapes = sizes.lamb_shapes
    params = [torch.randn(s, generator=gen).to(device) * 0.02 for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) * 1e-3 for s in shapes] for _ in range(sizes.lamb_steps)]
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_coeff=10.0, min_coeff=0.01)
    start = time.perf_counter()
    fallback = lamb_updates(lambda w: Lamb(w, **hyper), params, grads)
    try:
        from deepspeed.ops.lamb import FusedLamb

        fused = lamb_updates(lambda w: FusedLamb(w, **hyper), params, grads)
        status, note = "pass", "FusedLamb (CUDA kernel) vs bertds.engine.optim.Lamb"
    except Exception as e:  # the op cannot build on this accelerator: compare the fallback with itself instead
        fused = lamb_updates(lambda w: Lamb(w, **hyper), params, grads)
        status, note = "skip", f"FusedLamb unavailable on {device.type} ({type(e).__name__}); fallback vs itself"
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fused, fallback))
    moved = max(((a - p).abs().max() / p.abs().max()).item() for a, p in zip(fallback, params))
    if status == "pass":
        status = verdict(diff < 1e-4 < moved)
    return Check(
        "FusedLamb vs PyTorch LAMB",
        status,
        {"max_rel_diff": diff, "max_rel_update": moved, "steps": sizes.lamb_steps},
        note,
        run_s=time.perf_counter() - start,
    )


def fwd_bwd(model, batch: dict, fused: bool) -> tuple[float, list[torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    get_accelerator().synchronize()
    start = time.perf_counter()
    loss = model(**batch, return_logits=not fused).loss
    loss.backward()
    get_accelerator().synchronize()
    return loss.item(), [p.grad.float().clone() for p in model.parameters()], time.perf_counter() - start


def check_mlm_loss(sizes: Sizes, data_dir: str | None) -> Check:
    """The fused MLM loss against the plain logits path, bf16 weights, dropout off: equal loss and gradients
    within bf16 tolerance, and the time of forward + backward of each."""
    model_name, max_len, micro_batch = sizes.mlm_case
    cfg = BenchConfig(model=model_name, max_len=max_len, micro_batch=micro_batch, data_dir=data_dir)
    device = torch.device(get_accelerator().current_device_name())
    start = time.perf_counter()
    data, batches = load_batches(cfg, 0, 1)
    torch.manual_seed(0)
    config = get_config(
        cfg.model, vocab_size=len(data.vocab), pad_token_id=data.vocab.pad_id, dropout=0.0, attention_dropout=0.0
    )
    model = BertForPreTraining(config).to(device=device, dtype=torch.bfloat16).train()
    batch = {k: v.to(device) for k, v in next(iter(batches)).items()}
    setup = time.perf_counter() - start
    times: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for _ in range(sizes.mlm_repeats):
        for fused in (True, False):
            loss, grads, seconds = fwd_bwd(model, batch, fused)
            times[fused].append(seconds)
            results[fused] = (loss, grads)
    (loss_f, grads_f), (loss_l, grads_l) = results[True], results[False]
    grad_diff = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(grads_f, grads_l))
    loss_diff = abs(loss_f - loss_l) / abs(loss_l)
    median = statistics.median_high
    figures = {
        "loss_fused": loss_f,
        "loss_logits": loss_l,
        "loss_rel_diff": loss_diff,
        "grad_max_rel_diff": grad_diff,
        "fused_ms": 1e3 * median(times[True]),
        "logits_ms": 1e3 * median(times[False]),
    }
    return Check(
        "fused MLM loss vs logits (bf16)",
        verdict(loss_diff < 1e-2 and grad_diff < 5e-2),
        figures,
        "pass: loss within 1%, every gradient within 5% (relative norm)",
        setup,
        time.perf_counter() - start - setup,
    )


def check_two_ranks(sizes: Sizes, data_dir: str | None, force: bool) -> Check:
    devices = get_accelerator().device_count()
    if devices < 2 and not force:
        return Check("2 ranks", "skip", {"devices": devices}, f"only {devices} device(s) here: 2-rank path not run")
    case = sizes.cases[0]
    cmd = [
        *launcher(2),
        str(ROOT / "bench" / "throughput.py"),
        "--model",
        case.model,
        "--max-len",
        str(case.max_len),
        "--micro-batch",
        str(case.micro_batch),
        "--precision",
        case.precision,
        "--warmup",
        str(case.warmup),
        "--steps",
        str(case.steps),
        "--log-interval",
        str(case.steps),
    ]
    cmd += ["--data-dir", data_dir] if data_dir else []
    start = time.perf_counter()
    proc = run_subprocess(cmd, timeout=300)
    found = re.search(r"([\d.]+) sequences/s", proc.stdout)
    backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
    figures = {
        "exit_code": proc.returncode,
        "sequences_per_s": float(found.group(1)) if found else None,
        "backend": backend,
    }
    return Check(
        f"2 ranks ({case.name})",
        verdict(proc.returncode == 0 and found is not None),
        figures,
        "" if devices >= 2 else f"{devices} device(s): 2 CPU ranks on gloo (smoke)",
        run_s=time.perf_counter() - start,
    )


def run_report(args) -> list[Check]:
    sizes = SMOKE if args.smoke else FULL
    peaks = detect_peak(args.peak_tflops)
    main_ranks = min(2, max(1, get_accelerator().device_count())) if get_accelerator().device_name() == "cuda" else 1
    checks = [check_main_job(sizes, args.data_dir, main_ranks)]
    init_distributed()
    checks += [check_throughput(case, args.data_dir, peaks) for case in sizes.cases]
    checks += [check_fp16_scaling(sizes, args.data_dir), check_lamb(sizes), check_mlm_loss(sizes, args.data_dir)]
    shutdown_distributed()
    checks.append(check_two_ranks(sizes, args.data_dir, force=args.smoke))
    return checks


def print_table(checks: list[Check], header: str) -> None:
    print(header)
    print(f"{'check':<40} {'status':<6} {'setup s':>8} {'run s':>8}  figures")
    for c in checks:
        figures = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in c.figures.items()
            if not isinstance(v, list)
        )
        print(
            f"{c.name:<40} {c.status:<6} {c.setup_s:8.1f} {c.run_s:8.1f}  {figures}"
            + (f"  [{c.note}]" if c.note else "")
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes, every code path (CI, CPU)")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("BERTDS_DATA_DIR"),
        help="WikiText-2 directory; default: env BERTDS_DATA_DIR, else the hub",
    )
    p.add_argument("--peak-tflops", type=float, help="override the peak table (dense TFLOP/s, all precisions)")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole report must finish within this")
    p.add_argument("--json", help="write the table here as JSON")
    args = p.parse_args(argv)
    return run_cli(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """Runs every check and prints the table; exit code 1 if any check failed."""
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a directory; pass the WikiText-2 directory")
    start = time.perf_counter()
    accelerator = get_accelerator()
    if args.smoke and not accelerator.is_fp16_supported():
        # DeepSpeed refuses fp16 on CPU at initialize; the smoke still runs the fp16 loss-scaling path there.
        accelerator.is_fp16_supported = lambda: True
    checks = run_report(args)
    total = time.perf_counter() - start
    checks.append(Check("budget", verdict(total <= args.budget_s), {"total_s": total, "budget_s": args.budget_s}))
    device = accelerator.device_name()
    name = torch.cuda.get_device_name() if device == "cuda" else device
    peaks = detect_peak(args.peak_tflops)
    print_table(
        checks,
        f"bertds GPU report | {'smoke' if args.smoke else 'full'} | {name} × "
        f"{accelerator.device_count()} | peak TFLOP/s {peaks}",
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": name, "smoke": args.smoke, "peak_tflops": peaks, "checks": [asdict(c) for c in checks]},
                indent=2,
            )
            + "\n"
        )
    return 0 if all(c.status != "fail" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
