"""Pretraining with a DeepSpeed engine: data, model, ``deepspeed.initialize``, the step loop, the final save."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from bertds.data import DataConfig, PretrainingBatches, prepare_for_training
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.engine.config import load_ds_config, resolve_batch_sizes
from bertds.engine.step import micro_step
from bertds.errors import UserError
from bertds.model import BertForPreTraining, get_config, num_parameters
from bertds.pretrained import save_pretrained


@dataclass
class TrainConfig:
    """Flags of ``launcher/pretrain.py``; the defaults are the d2l recipe."""

    deepspeed_config: str
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "tiny"
    batch_size: int | None = None  # global sentence pairs per optimizer step; None: the JSON's train_batch_size
    max_steps: int = 50
    lr: float | None = None  # None: the JSON's optimizer lr
    output_dir: str = "runs/pretrain"
    log_interval: int = 10
    dropout: float | None = None
    untie_embeddings: bool = False
    activation_checkpointing: bool = False


def _print0(rank: int, message: str) -> None:
    if rank == 0:
        tqdm.write(message, file=sys.stdout)


def train(cfg: TrainConfig) -> dict:
    """Runs pretraining; returns the final metrics (averaged over all steps and ranks)."""
    ds_config = load_ds_config(cfg.deepspeed_config)
    model_config = get_config(cfg.model, dropout=cfg.dropout, attention_dropout=cfg.dropout,
                              tie_word_embeddings=not cfg.untie_embeddings)
    if cfg.data.max_len > model_config.max_position_embeddings:
        raise UserError(f"--max-len {cfg.data.max_len} exceeds the model's {model_config.max_position_embeddings} "
                        "positions; lower --max-len")
    if cfg.lr is not None:
        ds_config.setdefault("optimizer", {"type": "Adam", "params": {}}).setdefault("params", {})["lr"] = cfg.lr

    rank, world_size = init_distributed()
    ds_config = resolve_batch_sizes(ds_config, world_size, cfg.batch_size)
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())

    data = prepare_for_training(cfg.data, rank)
    _print0(rank, f"data: {len(data.examples)} sentence pairs, vocabulary {len(data.vocab)}, "
                  f"{'cached' if data.from_cache else 'prepared'} at {data.path}")

    torch.manual_seed(cfg.data.seed)
    model_config.vocab_size = len(data.vocab)
    model_config.pad_token_id = data.vocab.pad_id
    model = BertForPreTraining(model_config)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    _print0(rank, f"model: {cfg.model}, {num_parameters(model) / 1e6:.1f}M parameters")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    batches = iter(PretrainingBatches(data.examples, engine.train_micro_batch_size_per_gpu(), rank, world_size,
                                      seed=cfg.data.seed, num_workers=cfg.data.num_workers))
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.jsonl").write_text("")

    accumulation = engine.gradient_accumulation_steps()
    # Running sums stay on the device; they are read (one sync) only at logging steps.
    window = torch.zeros(4, device=device)  # mlm loss, nsp loss, micro-batches, real tokens
    totals = torch.zeros(4, device=device)
    one = torch.ones((), device=device)
    progress = tqdm(total=cfg.max_steps, disable=rank != 0, desc="pretraining", file=sys.stdout)
    start = window_start = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        for _ in range(accumulation):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            mlm_loss, nsp_loss = micro_step(engine, batch)
            window += torch.stack([mlm_loss, nsp_loss, one, batch["valid_len"].sum().float()])
        progress.update(1)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            dist.all_reduce(window)
            totals += window
            mlm, nsp, micro_batches, tokens = window.tolist()
            elapsed = time.perf_counter() - window_start
            steps_in_window = micro_batches / (accumulation * world_size)
            record = {"step": step, "mlm_loss": mlm / micro_batches, "nsp_loss": nsp / micro_batches,
                      "lr": engine.get_lr()[0], "pairs_per_s": steps_in_window * engine.train_batch_size() / elapsed,
                      "tokens_per_s": tokens / elapsed}
            if not math.isfinite(record["mlm_loss"] + record["nsp_loss"]):
                raise RuntimeError(f"loss became {record['mlm_loss']}/{record['nsp_loss']} at step {step}; "
                                   "lower --lr or check the data")
            _print0(rank, f"step {step:>6}/{cfg.max_steps} | mlm {record['mlm_loss']:.3f} | "
                          f"nsp {record['nsp_loss']:.3f} | lr {record['lr']:.2e} | "
                          f"{record['pairs_per_s']:.1f} pairs/s | {record['tokens_per_s']:.0f} tokens/s")
            if rank == 0:
                with open(output_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            window.zero_()
            window_start = time.perf_counter()
    accelerator.synchronize()
    elapsed = time.perf_counter() - start
    progress.close()

    mlm, nsp, micro_batches, tokens = totals.tolist()
    devices = [None] * world_size
    dist.all_gather_object(devices, str(device))
    result = {"mlm_loss": mlm / micro_batches, "nsp_loss": nsp / micro_batches,
              "pairs_per_s": cfg.max_steps * engine.train_batch_size() / elapsed, "tokens_per_s": tokens / elapsed,
              "devices": devices, "steps": cfg.max_steps}
    _print0(rank, f"MLM loss {result['mlm_loss']:.3f}, NSP loss {result['nsp_loss']:.3f}")
    _print0(rank, f"{result['pairs_per_s']:.1f} sentence pairs/sec on [{', '.join(devices)}]")

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # full weights also under ZeRO-3
        if rank == 0:
            save_pretrained(engine.module.state_dict(), model_config, data.vocab, output_dir)
            (output_dir / "train_config.json").write_text(json.dumps(
                {"train": asdict(cfg), "deepspeed": ds_config, "result": result}, indent=2) + "\n")
    _print0(rank, f"saved model, config and vocabulary to {output_dir}")
    return result


def main(cfg: TrainConfig) -> int:
    """CLI entry: user errors print one line and return exit code 2."""
    try:
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        shutdown_distributed()
    return 0
