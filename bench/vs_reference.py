"""bertds' training step against d2l's own BERT code (the ``d2l`` package's ``BERTModel``, ``torch.optim.Adam``,
the book's ``train_bert`` step and timer; see bench/d2l_book.py) and, with --transformers, against
``transformers.BertForPreTraining``: same model size, same batches (bertds' d2l-recipe batches, in d2l's dtypes for
d2l), one process, the initial weights carried over where the structures allow.
First it proves that bertds computes what a plain eager BERT computes (equal losses on the first two steps in eval
mode, i.e. without dropout, the second after one optimizer update) against the local replica of d2l's structure with
BERT's details (bench/reference_bert.py; d2l's own model differs: ReLU, no embedding LayerNorm), then it times
rounds of steps, alternating the contenders so that load from other processes hits them all alike, and prints the
median step time, pairs/s, achieved GFLOP/s (and the share of --peak-tflops) and the ratios to d2l.

    python bench/vs_reference.py --model tiny --max-len 64 --batch 512 --threads 2 [--peak-tflops 0.17]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# As launcher/pretrain.py sets it for the main job, before torch loads OpenMP; every contender runs in this process,
# so all of them get it, and keep_freed_memory below (set OMP_WAIT_POLICY to compare another policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import d2l_book
from bench.reference_bert import BERTModel, load_bertds_state_dict, pretraining_loss
from bench.throughput import (
    STEPS,
    BenchConfig,
    achieved,
    build_model,
    check,
    ds_config,
    load_batches,
    model_flops,
    split_parameters,
)
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.engine.host_memory import keep_freed_memory
from bertds.errors import UserError, run_cli
from bertds.model import MODEL_PRESETS

Batch = dict[str, torch.Tensor]


@dataclass
class Contender:
    name: str
    step: Callable[[Batch], torch.Tensor]  # one training step, returns the detached total loss
    set_training: Callable[[bool], None]
    timer: Callable[[], float] | None = None  # the contender's own clock (d2l's train_bert timer), else wall time


def bertds_contender(name: str, cfg: BenchConfig, vocab_size: int, pad_id: int, mlm_loss: str) -> Contender:
    model = build_model(cfg, vocab_size, pad_id)
    if cfg.compile:
        model.bert.compile()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(cfg))
    step = STEPS[mlm_loss]

    def total_loss(batch: Batch) -> torch.Tensor:
        return step(engine, batch).loss.detach()

    return Contender(name, total_loss, engine.train)


def replica_contender(cfg: BenchConfig, vocab_size: int, pad_id: int) -> Contender:
    source = build_model(cfg, vocab_size, pad_id)
    net = BERTModel(source.config).to(get_accelerator().current_device_name())
    load_bertds_state_dict(net, source.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def step(batch: Batch) -> torch.Tensor:
        loss = pretraining_loss(net, batch, vocab_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return Contender("replica (bench/reference_bert)", step, net.train)


def d2l_contender(d2l, cfg: BenchConfig, vocab_size: int, pad_id: int, batch: Batch) -> Contender:
    source = build_model(cfg, vocab_size, pad_id)
    net = d2l_book.build_bert(d2l, source.config, d2l_book.to_d2l_batch(batch))
    net = net.to(get_accelerator().current_device_name())
    unmapped = d2l_book.load_bertds_weights(net, source.state_dict())
    print(
        f"d2l {d2l_book.d2l_version()}: bertds' initial weights copied into d2l.BERTModel except {unmapped} "
        "(no counterpart); d2l's own ReLU, LayerNorm eps 1e-5, untied decoder"
    )
    trainer = d2l_book.BookTrainer(d2l, net, vocab_size, cfg.lr)
    return Contender("d2l (its own code)", trainer.step, net.train, lambda: trainer.timer_s)


def hf_contender(cfg: BenchConfig, vocab_size: int, pad_id: int) -> Contender | None:
    try:
        import transformers

        from bertds.hf import to_hf_config, to_hf_state_dict
    except ImportError:
        return None
    source = build_model(cfg, vocab_size, pad_id)
    net = transformers.BertForPreTraining(to_hf_config(source.config))
    net.load_state_dict(to_hf_state_dict(source.state_dict(), source.config), strict=False)
    net.to(get_accelerator().current_device_name())
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def step(batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"].long()
        labels = torch.full_like(tokens, -100)  # the real prediction slots carry labels, nothing else
        real = batch["mlm_weights"] > 0
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(real)
        labels[rows[real], batch["pred_positions"].long()[real]] = batch["mlm_labels"].long()[real]
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < batch["valid_len"][:, None]
        loss = net(
            input_ids=tokens,
            token_type_ids=batch["segments"].long(),
            attention_mask=mask.long(),
            labels=labels,
            next_sentence_label=batch["nsp_label"].long(),
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return Contender(f"transformers {transformers.__version__}", step, net.train)


def check_same_computation(cfg: BenchConfig, vocab_size: int, pad_id: int, batches: list[Batch]) -> None:
    """bertds' step against the replica: equal total losses on steps 1 and 2 (eval mode, one update between)."""
    print("same computation: total loss (MLM + NSP) on steps 1 and 2 from the same initial weights, eval mode")
    losses = {}
    for c in (replica_contender(cfg, vocab_size, pad_id), bertds_contender("bertds", cfg, vocab_size, pad_id, "fused")):
        c.set_training(False)
        losses[c.name] = [c.step(batches[i]).item() for i in range(2)]
        print(f"  {c.name:<32} {losses[c.name][0]:.6f}  {losses[c.name][1]:.6f}")
    replica, ours = losses.values()
    if any(abs(a - b) > 1e-4 * abs(b) for a, b in zip(ours, replica)):
        raise RuntimeError(f"bertds computes different losses {ours} than the replica {replica}")


def time_rounds(contenders: list[Contender], batches: list[Batch], rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each contender in each round; the order rotates every round."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    cycle = itertools.cycle(batches)
    for c in contenders:  # warm-up (and compilation) in training mode
        c.step(next(cycle)).item()
    for r in range(rounds):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            start, own = time.perf_counter(), c.timer() if c.timer else None
            for _ in range(steps):
                loss = c.step(next(cycle))
            loss.item()
            get_accelerator().synchronize()
            elapsed = c.timer() - own if c.timer else time.perf_counter() - start
            times[c.name].append(elapsed / steps)
    return times


def main_run(cfg: BenchConfig, rounds: int, steps_per_round: int, transformers: bool, threads: int) -> dict:
    check(cfg)
    _, world_size = init_distributed()
    if world_size != 1:
        raise UserError("vs_reference compares single-process steps; run it with plain python, not a launcher")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(get_accelerator().current_device_name())
    if device.type == "cpu":
        keep_freed_memory()  # as the main job's loop does; for every contender of this process
    data, batches = load_batches(cfg, 0, 1)  # first: `datasets` looks for the real torchvision that d2l's stubs hide
    d2l = d2l_book.import_d2l()
    if d2l is None:
        raise UserError("the d2l package is not installed; pip install d2l --no-deps")
    batch_list = [{k: v.to(device) for k, v in b.items()} for b in itertools.islice(iter(batches), 4)]
    vocab_size, pad_id = len(data.vocab), data.vocab.pad_id
    print(
        f"model {cfg.model} | max_len {cfg.max_len} | batch {cfg.micro_batch} | {cfg.precision} | {device} | "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']} | lr {cfg.lr} | "
        "batches: bertds' d2l-recipe batches for all"
    )
    check_same_computation(cfg, vocab_size, pad_id, batch_list)

    contenders = [
        d2l_contender(d2l, cfg, vocab_size, pad_id, batch_list[0]),
        bertds_contender("bertds (engine micro_step)", cfg, vocab_size, pad_id, "fused"),
    ]
    times = time_rounds(contenders, batch_list, rounds, steps_per_round)
    if transformers:  # all B·L MLM logits (GBs at batch 512): timed apart, so its memory traffic hits no one else
        hf = hf_contender(cfg, vocab_size, pad_id)
        if hf is None:
            raise UserError("--transformers: transformers is not installed")
        contenders.append(hf)
        times.update(time_rounds([hf], batch_list, rounds, steps_per_round))

    model = build_model(cfg, vocab_size, pad_id)
    per_token, per_slot = split_parameters(model)
    slots = statistics.mean(int((b["mlm_weights"] > 0).sum()) for b in batch_list)
    flops = model_flops(model.config, per_token, per_slot, cfg.micro_batch * cfg.max_len, slots, cfg.max_len)
    print(
        f"training step, median of {rounds} rounds × {steps_per_round} steps (dropout on, as the recipe); "
        f"GFLOP/s of bertds' model FLOPs ({flops / 1e9:.1f} GFLOP/step, as bench/throughput.py counts them)"
    )
    ref_time = statistics.median(times[contenders[0].name])
    result = {}
    for c in contenders:
        t = statistics.median(times[c.name])
        gflops, share = achieved(flops / t, cfg.peak_tflops)
        result[c.name] = {
            "step_s": t,
            "pairs_per_s": cfg.micro_batch / t,
            "speedup": ref_time / t,
            "gflops": gflops,
            "peak_pct": share,
        }
        print(
            f"  {c.name:<28} {t:.3f} s/step  {cfg.micro_batch / t:8.1f} pairs/s  ×{ref_time / t:.2f} vs d2l  "
            f"{gflops:6.1f} GFLOP/s{f' ({share:.1f}% of peak)' if share is not None else ''}"
            f"  (rounds: {' '.join(f'{x:.2f}' for x in times[c.name])})"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help=f"one of {', '.join(MODEL_PRESETS)}")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bertds' precision (d2l: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile bertds' encoder")
    p.add_argument("--transformers", action="store_true", help="also time transformers.BertForPreTraining")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01, help="the book's Adam learning rate")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, help="the machine's dense peak (2 Zen-4 cores: about 0.17 fp32)")
    p.add_argument("--data-dir", help="WikiText-2 directory; default: env BERTDS_DATA_DIR, else the hub")
    args = p.parse_args(argv)

    def run() -> dict:
        cfg = BenchConfig(
            model=args.model,
            max_len=args.max_len,
            micro_batch=args.batch,
            compile=args.compile,
            precision=args.precision,
            lr=args.lr,
            peak_tflops=args.peak_tflops,
            data_dir=args.data_dir,
        )
        return main_run(cfg, args.rounds, args.steps_per_round, args.transformers, args.threads)

    try:
        return run_cli(run)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
