"""Pretraining with a DeepSpeed engine: data, model, ``deepspeed.initialize``, the step loop, the final save."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from bertds.data import CorpusSource, ExampleConfig, PretrainingBatches, prepare_pretraining_data
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.errors import UserError
from bertds.model import BertForPreTraining, get_config, num_parameters
from bertds.pretrained import save_pretrained


@dataclass
class TrainConfig:
    """Flags of ``launcher/pretrain.py``; the defaults are the d2l recipe."""

    deepspeed_config: str
    model: str = "tiny"
    max_len: int = 64
    batch_size: int | None = None  # global sentence pairs per optimizer step; None: the JSON's train_batch_size
    max_steps: int = 50
    lr: float | None = None  # None: the JSON's optimizer lr
    seed: int = 0
    data_dir: str | None = None
    cache_dir: str | None = None
    output_dir: str = "runs/pretrain"
    log_interval: int = 10
    truncate: bool = False
    dropout: float | None = None
    untie_embeddings: bool = False
    activation_checkpointing: bool = False
    num_workers: int = 0


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; pass --deepspeed_config ds_configs/<name>.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        "fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object; fix the file")
    return config


def resolve_batch_sizes(ds_config: dict, world_size: int, batch_size: int | None = None) -> dict:
    """Fills train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps so that
    global = micro × accumulation × world size, or raises a UserError naming the numbers."""
    config = dict(ds_config)
    if batch_size is not None:
        config["train_batch_size"] = batch_size
        config.pop("train_micro_batch_size_per_gpu", None)
    total = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    if total is None and micro is None:
        raise UserError("the DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu; "
                        "set one of them or pass --batch-size")
    if total is None:
        total = micro * (accum or 1) * world_size
    elif micro is None:
        accum = accum or 1
        if total % (accum * world_size):
            raise UserError(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} "
                            f"× world size {world_size}; choose a batch size that is a multiple of "
                            f"{accum * world_size}")
        micro = total // (accum * world_size)
    elif accum is None:
        if total % (micro * world_size):
            raise UserError(f"train_batch_size {total} is not divisible by micro batch {micro} × world size "
                            f"{world_size}; choose a batch size that is a multiple of {micro * world_size}")
        accum = total // (micro * world_size)
    accum = accum or 1
    if micro * accum * world_size != total:
        raise UserError(f"train_batch_size {total} != micro batch {micro} × gradient accumulation {accum} × "
                        f"world size {world_size} = {micro * accum * world_size}; fix the DeepSpeed config")
    config.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return config


def pretraining_losses(mlm_logits: torch.Tensor, nsp_logits: torch.Tensor,
                       batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM cross-entropy averaged over the real prediction positions, and NSP cross-entropy (d2l's loss)."""
    weights = batch["mlm_weights"].reshape(-1).float()
    mlm = F.cross_entropy(mlm_logits.float().flatten(0, 1), batch["mlm_labels"].reshape(-1).long(),
                          reduction="none")
    mlm_loss = (mlm * weights).sum() / (weights.sum() + 1e-8)
    nsp_loss = F.cross_entropy(nsp_logits.float(), batch["nsp_label"].long())
    return mlm_loss, nsp_loss


def _print0(rank: int, message: str) -> None:
    if rank == 0:
        tqdm.write(message, file=sys.stdout)


def train(cfg: TrainConfig) -> dict:
    """Runs pretraining; returns the final metrics (averaged over all steps and ranks)."""
    ds_config = load_ds_config(cfg.deepspeed_config)
    source = CorpusSource.resolve(cfg.data_dir)
    model_config = get_config(cfg.model, dropout=cfg.dropout, attention_dropout=cfg.dropout,
                              tie_word_embeddings=not cfg.untie_embeddings)
    if cfg.max_len > model_config.max_position_embeddings:
        raise UserError(f"--max-len {cfg.max_len} exceeds the model's {model_config.max_position_embeddings} "
                        "positions; lower --max-len")
    if cfg.lr is not None:
        ds_config.setdefault("optimizer", {"type": "Adam", "params": {}}).setdefault("params", {})["lr"] = cfg.lr

    rank, world_size = init_distributed()
    ds_config = resolve_batch_sizes(ds_config, world_size, cfg.batch_size)
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())

    example_config = ExampleConfig(max_len=cfg.max_len, seed=cfg.seed, truncate=cfg.truncate)
    if rank == 0:  # one rank builds the cache; the others then read it
        prepare_pretraining_data(source, example_config, cfg.cache_dir)
    dist.barrier()
    data = prepare_pretraining_data(source, example_config, cfg.cache_dir)
    _print0(rank, f"data: {len(data.examples)} sentence pairs, vocabulary {len(data.vocab)}, "
                  f"{'cached' if data.from_cache else 'prepared'} at {data.path}")

    torch.manual_seed(cfg.seed)
    model_config.vocab_size = len(data.vocab)
    model_config.pad_token_id = data.vocab.pad_id
    model = BertForPreTraining(model_config)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    _print0(rank, f"model: {cfg.model}, {num_parameters(model) / 1e6:.1f}M parameters")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    batches = iter(PretrainingBatches(data.examples, engine.train_micro_batch_size_per_gpu(), rank, world_size,
                                      seed=cfg.seed, num_workers=cfg.num_workers))
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.jsonl").write_text("")

    accumulation = engine.gradient_accumulation_steps()
    # Running sums stay on the device; they are read (one sync) only at logging steps.
    window = torch.zeros(4, device=device)  # mlm loss, nsp loss, micro-batches, real tokens
    totals = torch.zeros(4, device=device)
    progress = tqdm(total=cfg.max_steps, disable=rank != 0, desc="pretraining", file=sys.stdout)
    start = window_start = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        for _ in range(accumulation):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            _, mlm_logits, nsp_logits = engine(batch["tokens"], batch["segments"], batch["valid_len"],
                                               batch["pred_positions"])
            mlm_loss, nsp_loss = pretraining_losses(mlm_logits, nsp_logits, batch)
            engine.backward(mlm_loss + nsp_loss)
            engine.step()
            window += torch.stack([mlm_loss.detach(), nsp_loss.detach(), torch.ones((), device=device),
                                   batch["valid_len"].sum().float()])
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
