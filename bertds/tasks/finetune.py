"""Fine-tuning a pretrained BERT on SNLI with a DeepSpeed engine: data, classifier, ``deepspeed.initialize``, the
epoch loop, accuracy on the evaluation splits after every epoch, and the best model saved."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bertds.data.tokenizer import Vocab
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.engine.config import load_ds_config, resolve_batch_sizes, with_lr
from bertds.engine.gathered import all_devices, write_full_weights
from bertds.engine.optim import adapt_optimization
from bertds.engine.tracking import Tracker
from bertds.errors import UserError, run_cli
from bertds.model import BertForPreTraining
from bertds.options import option
from bertds.tasks.classifier import BertClassifier, save_classifier
from bertds.tasks.nli import LABELS, SPLITS, TokenizedPairs, load_split

BEST_DIR = "best"
RESULT_FILE = "finetune_config.json"


@dataclass
class FinetuneConfig:
    """Flags of ``launcher/finetune_snli.py``; with ds_configs/finetune_snli.json (batch 512, Adam lr 1e-4) the
    defaults are d2l's SNLI recipe."""

    deepspeed_config: str
    checkpoint: str | None = option(None, "a pretraining run's --output-dir, or a DeepSpeed checkpoint of it")
    init_from_hf: str | None = option(None, "or a Hugging Face BERT directory (e.g. bert-base-uncased)")
    data_dir: str | None = option(
        None,
        "directory with SNLI's snli_1.0_{train,dev,test}.jsonl or .txt, or "
        "{split}.tsv (label<TAB>premise<TAB>hypothesis); default: the hub",
    )
    train_split: str = option("train", "the split to train on", choices=list(SPLITS))
    eval_splits: list[str] = option(
        help="evaluated after every epoch; the best model is chosen on the first",
        choices=list(SPLITS),
        default_factory=lambda: ["dev", "test"],
    )
    max_len: int = option(128, "tokens per pair, <cls>/<sep> included; longer pairs are cut, longest sentence first")
    epochs: int = option(5, "passes over the training split")
    batch_size: int | None = option(None, "global pairs per optimizer step; default: from the JSON")
    lr: float | None = option(None, "learning rate; default: from the JSON")
    max_train_pairs: int | None = option(None, "train on a seeded random subset of this many pairs")
    max_eval_pairs: int | None = option(None, "evaluate on a seeded random subset of this many pairs per split")
    seed: int = option(0, "seed of the classifier's output layer, the subsets and the data order")
    output_dir: str = option("runs/finetune_snli", "metrics.jsonl, best/, finetune_config.json")

    def __post_init__(self) -> None:
        if bool(self.checkpoint) == bool(self.init_from_hf):
            raise UserError(
                "pass exactly one of --checkpoint RUN (a bertds run) or --init-from-hf DIR (a Hugging "
                "Face BERT directory)"
            )


def load_backbone(cfg: FinetuneConfig) -> tuple[BertForPreTraining, Vocab]:
    if cfg.init_from_hf:
        from bertds.hf import load_hf_pretrained

        return load_hf_pretrained(cfg.init_from_hf)
    from bertds.export import load_checkpoint

    assert cfg.checkpoint is not None  # exactly one of the two, checked above
    return load_checkpoint(cfg.checkpoint)


class RankShard(Dataset):
    """This rank's share of an evaluation set, topped up with zero-weight copies so that every rank runs the same
    number of forward passes (ZeRO-3 gathers the weights collectively in each one)."""

    def __init__(self, data: TokenizedPairs, rank: int, world_size: int):
        self.data, self.indices = data, list(range(rank, len(data), world_size))
        self.size = math.ceil(len(data) / world_size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return self.data[self.indices[i] if i < len(self.indices) else 0], float(i < len(self.indices))

    def collate(self, items) -> dict[str, torch.Tensor]:
        pairs, weights = zip(*items)
        return {**self.data.collate(list(pairs)), "weight": torch.tensor(weights)}


@torch.no_grad()
def evaluate(engine, loader: DataLoader, device: torch.device) -> float:
    engine.eval()
    counts = torch.zeros(2, device=device)  # correct, pairs
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(batch["tokens"], batch["segments"], batch["valid_len"])
        correct = (logits.argmax(-1) == batch["label"]).float()
        counts += torch.stack([(correct * batch["weight"]).sum(), batch["weight"].sum()])
    dist.all_reduce(counts)
    engine.train()
    return (counts[0] / counts[1]).item()


def finetune(cfg: FinetuneConfig) -> dict:
    """Runs fine-tuning; returns the final epoch's record and the best one."""
    ds_config = with_lr(load_ds_config(cfg.deepspeed_config), cfg.lr)
    if not cfg.eval_splits or cfg.train_split in cfg.eval_splits:
        raise UserError(
            f"evaluate on splits other than the training split '{cfg.train_split}'; pass e.g. "
            "--train-split dev --eval-splits test"
        )
    train_pairs = load_split(cfg.data_dir, cfg.train_split).sample(cfg.max_train_pairs, cfg.seed)
    eval_pairs = {s: load_split(cfg.data_dir, s).sample(cfg.max_eval_pairs, cfg.seed) for s in cfg.eval_splits}
    pretrained, vocab = load_backbone(cfg)
    if cfg.max_len > pretrained.config.max_position_embeddings:
        raise UserError(
            f"--max-len {cfg.max_len} exceeds the model's {pretrained.config.max_position_embeddings} "
            "positions; lower --max-len"
        )
    rank, world_size = init_distributed()
    ds_config = resolve_batch_sizes(ds_config, world_size, cfg.batch_size)
    train_data = TokenizedPairs(train_pairs, vocab, cfg.max_len)
    steps_per_epoch = math.ceil(len(train_data) / ds_config["train_batch_size"])
    engine_config, client_optimizer, client_scheduler = adapt_optimization(ds_config, cfg.epochs * steps_per_epoch)

    torch.manual_seed(cfg.seed)
    model = BertClassifier(pretrained.bert, len(LABELS))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=engine_config,
        optimizer=client_optimizer,
        lr_scheduler=client_scheduler,
    )
    device = torch.device(get_accelerator().current_device_name())
    micro_batch = engine.train_micro_batch_size_per_gpu()
    sampler: DistributedSampler = DistributedSampler(
        train_data, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed
    )
    train_loader = DataLoader(train_data, batch_size=micro_batch, sampler=sampler, collate_fn=train_data.collate)
    eval_loaders = {}
    for split, pairs in eval_pairs.items():
        shard = RankShard(TokenizedPairs(pairs, vocab, cfg.max_len), rank, world_size)
        eval_loaders[split] = DataLoader(shard, batch_size=micro_batch, collate_fn=shard.collate)

    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(output_dir, rank, {}, use_wandb=False, project="bertds", run_name=None)
    tracker.print(
        f"data: train {train_pairs.source} ({len(train_pairs)} pairs); "
        + "; ".join(f"{s} {p.source} ({len(p)} pairs)" for s, p in eval_pairs.items())
    )
    tracker.print(
        f"model: {pretrained.config.num_layers} layers, hidden {pretrained.config.hidden_size}, new "
        f"{len(LABELS)}-way output layer; world size {world_size}, micro batch {micro_batch}, "
        f"accumulation {engine.gradient_accumulation_steps()}; {cfg.epochs} epochs of {steps_per_epoch} "
        "steps"
    )

    best: dict | None = None
    train_seconds = 0.0
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        sums = torch.zeros(3, device=device)  # loss × pairs, correct, pairs
        start = time.perf_counter()
        for batch in train_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = engine(batch["tokens"], batch["segments"], batch["valid_len"])
            loss = F.cross_entropy(logits.float(), batch["label"])
            engine.backward(loss)
            engine.step()
            with torch.no_grad():
                n = batch["label"].numel()
                sums += torch.stack(
                    [
                        loss.detach() * n,
                        (logits.argmax(-1) == batch["label"]).sum(),
                        torch.tensor(float(n), device=device),
                    ]
                )
        dist.all_reduce(sums)
        train_seconds += time.perf_counter() - start
        record = {
            "epoch": epoch,
            "step": engine.global_steps,
            "loss": (sums[0] / sums[2]).item(),
            "train_acc": (sums[1] / sums[2]).item(),
            **{f"{s}_acc": evaluate(engine, loader, device) for s, loader in eval_loaders.items()},
            "pairs_per_s": epoch * len(train_data) / train_seconds,
        }
        tracker.log(record)
        tracker.print(
            f"epoch {epoch}/{cfg.epochs} | loss {record['loss']:.3f} | train acc {record['train_acc']:.3f}"
            + "".join(f" | {s} acc {record[f'{s}_acc']:.3f}" for s in eval_loaders)
            + f" | {record['pairs_per_s']:.1f} pairs/s"
        )
        selected = f"{cfg.eval_splits[0]}_acc"
        if best is None or record[selected] > best[selected]:
            best = record
            save_best(engine, model, vocab, cfg, record, {s: p.source for s, p in eval_pairs.items()})

    devices = all_devices(device)
    tracker.print(
        f"loss {record['loss']:.3f}, train acc {record['train_acc']:.3f}, "
        + ", ".join(f"{s} acc {record[f'{s}_acc']:.3f}" for s in eval_loaders)
    )
    tracker.print(f"{record['pairs_per_s']:.1f} pairs/sec on [{', '.join(devices)}]")
    assert best is not None, "--epochs 0 trains nothing"
    tracker.print(f"best epoch {best['epoch']} by {cfg.eval_splits[0]} accuracy, saved to {cfg.output_dir}/{BEST_DIR}")
    result = {
        "final": record,
        "best": best,
        "train_source": train_pairs.source,
        "eval_sources": {s: p.source for s, p in eval_pairs.items()},
    }
    if rank == 0:
        (output_dir / RESULT_FILE).write_text(
            json.dumps({"finetune": asdict(cfg), "deepspeed": ds_config, "result": result}, indent=2) + "\n"
        )
    return result


def save_best(
    engine, model: BertClassifier, vocab: Vocab, cfg: FinetuneConfig, record: dict, eval_sources: dict
) -> None:
    """Collective: the classifier's whole weights (gathered, also under ZeRO-3) into OUTPUT/best on rank 0."""
    info = {
        "labels": list(LABELS),
        "max_len": cfg.max_len,
        "epoch": record["epoch"],
        "selected_on": cfg.eval_splits[0],
        "accuracies": {k: v for k, v in record.items() if k.endswith("_acc")},
        "eval_sources": eval_sources,
    }
    write_full_weights(
        engine,
        lambda state_dict: save_classifier(state_dict, model.bert.config, vocab, info, Path(cfg.output_dir) / BEST_DIR),
    )


def main(cfg: FinetuneConfig) -> int:
    """CLI entry: user errors print one line and exit 2."""
    try:
        return run_cli(lambda: finetune(cfg))
    finally:
        shutdown_distributed()
