"""Training throughput of bertds through the real DeepSpeed engine: sequences/s, tokens/s, model TFLOP/s, MFU and
data wait per step. Runs unchanged on CPU (gloo) and CUDA (nccl), with plain python or a launcher:

    python bench/throughput.py --model tiny --max-len 64 --micro-batch 512
    deepspeed --num_gpus 8 bench/throughput.py --model large --max-len 512 --micro-batch 8 --zero 2 \
        --precision bf16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import functools
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bertds.data import DataConfig, ExampleConfig, PretrainingBatches, prepare_pretraining_data, resolve_corpus
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.engine import micro_step
from bertds.errors import UserError, run_cli
from bertds.model import BertConfig, BertForPreTraining, get_config
from bertds.options import add_options, from_args, option, redefault
from bertds.plan import JobShape

STEPS = {"fused": micro_step, "logits": functools.partial(micro_step, fused=False)}


@dataclass
class BenchConfig(JobShape):
    """The job shape (bertds.plan's) and how to time it; the defaults are d2l's recipe on a CPU."""

    model: str = redefault(JobShape, "model", "tiny")
    max_len: int = redefault(JobShape, "max_len", 64)
    micro_batch: int = redefault(JobShape, "micro_batch", 512)
    zero: int = redefault(JobShape, "zero", 0)
    precision: str = redefault(JobShape, "precision", "fp32")
    compile: bool = option(False, "torch.compile the encoder")
    mlm_loss: str = option(
        "fused",
        "fused: MLM loss inside the model on the real slots (the default step); logits: the (B, P, V) logits path",
        choices=list(STEPS),
    )
    warmup: int = option(3, "untimed steps first")
    steps: int = option(10, "timed steps")
    log_interval: int = option(5, "steps between loss reads (host syncs)")
    lr: float = option(1e-4, "Adam learning rate")
    peak_tflops: float | None = option(None, "the device's dense peak for --precision, for MFU")
    data_dir: str | None = option(None, "WikiText-2 directory; default: env BERTDS_DATA_DIR, else the hub")
    seed: int = option(0, "seed of the model's weights and the data order")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 8 <= self.max_len <= 512:
            raise UserError(f"--max-len {self.max_len} is outside 8..512")
        if self.steps < 1 or self.warmup < 0 or self.log_interval < 1:
            raise UserError("--steps and --log-interval must be positive, --warmup non-negative")


def ds_config(cfg: BenchConfig) -> dict:
    # torch's fused Adam (one kernel per dtype/device group, CPU and CUDA) instead of DeepSpeed's JIT-built one;
    # adam_w_mode False: DeepSpeed's "Adam" is AdamW otherwise.
    adam = {"lr": cfg.lr, "weight_decay": 0.0, "torch_adam": True, "adam_w_mode": False, "fused": True}
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": adam},
        "zero_optimization": {"stage": cfg.zero},
        "steps_per_print": 10**9,
    }
    if cfg.precision != "fp32":
        config[cfg.precision] = {"enabled": True}
    return config


def check(cfg: BenchConfig) -> None:
    """What depends on the machine (the config checked its own values when it was built)."""
    if cfg.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise UserError(f"fp16 is not supported on {get_accelerator().device_name()}; use --precision bf16 or fp32")


class Prefetcher:
    """Host batches from a background thread, so the step never waits for the Arrow reads; ``wait_s`` sums the
    time the step loop spent blocked on data (queue wait and the host-to-device copy call)."""

    def __init__(self, batches, device: torch.device, depth: int = 4):
        self.device, self.wait_s = device, 0.0
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        threading.Thread(target=lambda: [self.queue.put(b) for b in batches], daemon=True).start()

    def next(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.queue.get().items()}
        self.wait_s += time.perf_counter() - start
        return batch


def split_parameters(model: BertForPreTraining) -> tuple[int, int]:
    """(weights applied to every token: encoder layers, pooler, NSP; weights applied per prediction slot: MLM head
    with the tied decoder). Embedding tables are lookups, not matmuls, and are left out."""

    def unique(module: torch.nn.Module) -> dict[int, int]:
        return {id(p): p.numel() for p in module.parameters()}

    per_token = sum(unique(model.bert.encoder).values()) + sum(unique(model.bert.pooler).values())
    per_token += sum(unique(model.nsp).values())
    return per_token, sum(unique(model.mlm).values())


def model_flops(config: BertConfig, per_token: int, per_slot: int, tokens: int, slots: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 × forward, 2 FLOPs per multiply-add): 6·N·tokens for the weights
    plus attention QKᵀ and AV, 12·layers·hidden·seq_len per token."""
    return 6 * (per_token * tokens + per_slot * slots) + 12 * config.num_layers * config.hidden_size * seq_len * tokens


FLOPS_FORMULA = (
    "6·(N_tok·B·L + N_mlm·S) + 12·layers·hidden·L·B·L; N_tok = encoder+pooler+NSP weights, N_mlm = MLM "
    "head incl. tied decoder, S = real prediction slots, embedding lookups not counted"
)


def achieved(flops_per_s: float, peak_tflops: float | None) -> tuple[float, float | None]:
    """(GFLOP/s, percent of ``peak_tflops`` or None without one)."""
    return flops_per_s / 1e9, 100 * flops_per_s / (peak_tflops * 1e12) if peak_tflops else None


def load_batches(cfg: BenchConfig, rank: int, world_size: int):
    data_cfg = DataConfig(data_dir=cfg.data_dir, max_len=cfg.max_len, seed=cfg.seed)
    source = resolve_corpus(None, data_cfg.data_dir)
    examples = ExampleConfig(max_len=cfg.max_len, seed=cfg.seed)
    if rank == 0:
        prepare_pretraining_data(source, examples)
    dist.barrier()
    data = prepare_pretraining_data(source, examples)
    return data, PretrainingBatches(data.examples, cfg.micro_batch, rank, world_size, seed=cfg.seed)


def build_model(cfg: BenchConfig, vocab_size: int, pad_id: int) -> BertForPreTraining:
    torch.manual_seed(cfg.seed)
    return BertForPreTraining(get_config(cfg.model, vocab_size=vocab_size, pad_token_id=pad_id))


@dataclass
class Timed:
    elapsed: float  # seconds of the timed steps (after warm-up)
    slots: float  # real MLM prediction slots in the timed steps
    step_times: list[float]  # host seconds per step, warm-up included
    logged: list[tuple[int, float, float]]  # (step, mean MLM loss, mean NSP loss) every log_interval steps


def timed_steps(cfg: BenchConfig, engine, step_fn, prefetch: Prefetcher) -> Timed:
    """cfg.warmup untimed then cfg.steps timed training steps; the losses are read every log_interval steps only."""
    accelerator, device = get_accelerator(), prefetch.device
    losses = torch.zeros(2, device=device)
    slots = torch.zeros((), device=device)
    step_times, logged = [], []
    for step in range(1, cfg.warmup + cfg.steps + 1):
        if step == cfg.warmup + 1:
            accelerator.synchronize()
            prefetch.wait_s = 0.0
            slots.zero_()
            start = time.perf_counter()
        t0 = time.perf_counter()
        batch = prefetch.next()
        out = step_fn(engine, batch)
        losses += torch.stack([out.mlm_loss.detach(), out.nsp_loss.detach()])
        slots += (batch["mlm_weights"] > 0).sum()
        if step % cfg.log_interval == 0:  # the only host-device sync of the loop
            logged.append((step, *(losses / cfg.log_interval).tolist()))
            losses.zero_()
        step_times.append(time.perf_counter() - t0)
    accelerator.synchronize()
    elapsed = time.perf_counter() - start
    return Timed(elapsed, slots.item(), step_times, logged)


def run(cfg: BenchConfig) -> dict:
    check(cfg)
    rank, world_size = init_distributed()
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    data, batches = load_batches(cfg, rank, world_size)
    model = build_model(cfg, len(data.vocab), data.vocab.pad_id)
    per_token, per_slot = split_parameters(model)
    if cfg.compile:
        model.bert.compile()  # in place: parameter names and state-dict keys stay as they are
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(cfg))
    prefetch = Prefetcher(iter(batches), device)
    timed = timed_steps(cfg, engine, STEPS[cfg.mlm_loss], prefetch)
    elapsed, slots, step_times, logged = timed.elapsed, timed.slots, timed.step_times, timed.logged

    sequences = cfg.micro_batch * cfg.steps
    totals = torch.tensor(
        [sequences, sequences * cfg.max_len, slots, prefetch.wait_s, elapsed], dtype=torch.float64, device=device
    )
    dist.all_reduce(totals)  # sums over ranks (wait and elapsed: averaged below)
    sequences, tokens, slots_total, wait_s, elapsed = totals.tolist()
    wait_s, elapsed = wait_s / world_size, elapsed / world_size
    flops = model_flops(model.config, per_token, per_slot, int(tokens), int(slots_total), cfg.max_len)
    tflops_per_device = flops / elapsed / world_size / 1e12
    result = {
        "step_s": elapsed / cfg.steps,
        "sequences_per_s": sequences / elapsed,
        "tokens_per_s": tokens / elapsed,
        "tflops_per_device": tflops_per_device,
        "data_wait_pct": 100 * wait_s / elapsed,
        "mfu_pct": achieved(tflops_per_device * 1e12, cfg.peak_tflops)[1],
        "median_step_s": statistics.median(step_times[cfg.warmup :]),
        "losses": logged,
        "world_size": world_size,
        "device": str(device),
    }
    if rank == 0:
        print(
            f"bertds throughput | model {cfg.model} | max_len {cfg.max_len} | micro batch {cfg.micro_batch} × "
            f"{world_size} rank(s) on {device.type} | ZeRO-{cfg.zero} | {cfg.precision} | "
            f"{'compiled' if cfg.compile else 'eager'} | MLM loss {cfg.mlm_loss} | threads/rank "
            f"{torch.get_num_threads()}"
        )
        for step, mlm, nsp in logged:
            print(f"step {step:>4} | mlm {mlm:.3f} | nsp {nsp:.3f}")
        print(
            f"{cfg.warmup} warm-up + {cfg.steps} timed steps: {result['step_s']:.3f} s/step (median "
            f"{result['median_step_s']:.3f}) | {result['sequences_per_s']:.1f} sequences/s | "
            f"{result['tokens_per_s']:.0f} tokens/s (padded) | data wait {result['data_wait_pct']:.2f}% of step time"
        )
        print(f"model FLOPs {flops / cfg.steps:.3e}/step = {FLOPS_FORMULA}")
        mfu = f"{result['mfu_pct']:.1f}% of {cfg.peak_tflops} TFLOP/s" if cfg.peak_tflops else "n/a (--peak-tflops)"
        print(
            f"achieved {tflops_per_device * 1e3:.1f} GFLOP/s ({tflops_per_device:.3f} TFLOP/s) per device | MFU {mfu}"
        )
    return result


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p, BenchConfig)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return from_args(BenchConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(lambda: run(parse_args(argv)))
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
