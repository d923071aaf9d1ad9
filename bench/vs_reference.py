"""bertds' training step against a straightforward eager BERT (d2l's structure, plain Adam, no DeepSpeed) and, when
installed, ``transformers.BertForPreTraining``: same model size, same initial weights, same batches, one process.
First it proves the computations are the same (equal losses on the first two steps in eval mode, i.e. without
dropout, the second after one optimizer update), then it times rounds of steps, alternating the contenders so
that load from other processes hits them all alike (transformers in rounds of its own afterwards), and prints the
ratios to the reference.

    python bench/vs_reference.py --model tiny --max-len 64 --batch 512 [--compile]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reference_bert import BERTModel, load_bertds_state_dict, pretraining_loss  # noqa: E402
from bench.throughput import STEPS, BenchConfig, build_model, check, ds_config, load_batches, run_cli  # noqa: E402
from bertds.distributed import init_distributed  # noqa: E402
from bertds.errors import UserError  # noqa: E402
from bertds.model import MODEL_PRESETS  # noqa: E402

Batch = dict[str, torch.Tensor]


@dataclass
class Contender:
    name: str
    step: Callable[[Batch], torch.Tensor]  # one training step, returns the detached total loss
    set_training: Callable[[bool], None]


def bertds_contender(name: str, cfg: BenchConfig, vocab_size: int, pad_id: int, mlm_loss: str,
                     compile: bool) -> Contender:
    model = build_model(cfg, vocab_size, pad_id)
    if compile:
        model.bert.compile()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(BenchConfig(micro_batch=cfg.micro_batch, lr=cfg.lr)))
    step = STEPS[mlm_loss]
    def total_loss(batch: Batch) -> torch.Tensor:
        return step(engine, batch).loss.detach()

    return Contender(name, total_loss, engine.train)


def reference_contender(cfg: BenchConfig, vocab_size: int, pad_id: int) -> Contender:
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

    return Contender("d2l reference", step, net.train)


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
        loss = net(input_ids=tokens, token_type_ids=batch["segments"].long(), attention_mask=mask.long(),
                   labels=labels, next_sentence_label=batch["nsp_label"].long()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return Contender(f"transformers {transformers.__version__}", step, net.train)


def main_run(cfg: BenchConfig, rounds: int, steps_per_round: int) -> dict:
    check(cfg)
    _, world_size = init_distributed()
    if world_size != 1:
        raise UserError("vs_reference compares single-process steps; run it with plain python, not a launcher")
    device = torch.device(get_accelerator().current_device_name())
    data, batches = load_batches(cfg, 0, 1)
    batch_list = [{k: v.to(device) for k, v in b.items()} for b in itertools.islice(iter(batches), 4)]
    vocab_size, pad_id = len(data.vocab), data.vocab.pad_id
    contenders = [reference_contender(cfg, vocab_size, pad_id),
                  bertds_contender("bertds, logits path", cfg, vocab_size, pad_id, "logits", False),
                  bertds_contender("bertds (engine micro_step)", cfg, vocab_size, pad_id, "fused", False)]
    if cfg.compile:
        contenders.append(bertds_contender("bertds + compile", cfg, vocab_size, pad_id, "fused", True))
    hf = hf_contender(cfg, vocab_size, pad_id)
    if hf is not None:
        contenders.append(hf)

    print(f"model {cfg.model} | max_len {cfg.max_len} | batch {cfg.micro_batch} | fp32 | {device} | "
          f"{torch.get_num_threads()} threads | transformers {'included' if hf else 'not installed'}")
    print("same computation: total loss (MLM + NSP) on steps 1 and 2 from the same initial weights, eval mode")
    first_losses = {}
    for c in contenders:
        c.set_training(False)
        first_losses[c.name] = [c.step(batch_list[i]).item() for i in range(2)]
        c.set_training(True)
        print(f"  {c.name:<28} {first_losses[c.name][0]:.6f}  {first_losses[c.name][1]:.6f}")
    reference = first_losses[contenders[0].name]
    for name, losses in first_losses.items():
        if any(abs(a - b) > 1e-4 * abs(b) for a, b in zip(losses, reference)):
            raise RuntimeError(f"{name} computes different losses {losses} than the reference {reference}")

    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    batch_cycle = itertools.cycle(batch_list)
    # transformers computes the MLM logits of all B·L positions (2.6 GB at batch 512): timed apart, after the
    # others, so that its memory traffic does not slow down whoever runs next.
    for group in ([c for c in contenders if c is not hf], [hf] if hf else []):
        for c in group:  # warm-up (and compilation) in training mode
            c.step(next(batch_cycle)).item()
        for r in range(rounds):
            for c in group[r % len(group):] + group[:r % len(group)]:  # rotate the order
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    loss = c.step(next(batch_cycle))
                loss.item()
                get_accelerator().synchronize()
                times[c.name].append((time.perf_counter() - start) / steps_per_round)

    print(f"training step, median of {rounds} rounds × {steps_per_round} steps (dropout on, as the recipe):")
    ref_time = statistics.median(times[contenders[0].name])
    result = {}
    for c in contenders:
        t = statistics.median(times[c.name])
        result[c.name] = {"step_s": t, "pairs_per_s": cfg.micro_batch / t, "speedup": ref_time / t,
                          "first_losses": first_losses[c.name]}
        print(f"  {c.name:<28} {t:.3f} s/step  {cfg.micro_batch / t:8.1f} pairs/s  ×{ref_time / t:.2f} vs reference"
              f"  (rounds: {' '.join(f'{x:.2f}' for x in times[c.name])})")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help=f"one of {', '.join(MODEL_PRESETS)}")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="also time bertds with the encoder torch.compiled")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--data-dir", help="WikiText-2 directory; default: env BERTDS_DATA_DIR, else the hub")
    args = p.parse_args(argv)
    cfg = BenchConfig(model=args.model, max_len=args.max_len, micro_batch=args.batch, compile=args.compile,
                      lr=args.lr, data_dir=args.data_dir)
    return run_cli(lambda: main_run(cfg, args.rounds, args.steps_per_round))


if __name__ == "__main__":
    sys.exit(main())
