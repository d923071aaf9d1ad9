"""Prepared pretraining data: built once, cached on disk as Arrow, memory-mapped, sharded per rank."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from deepspeed.accelerator import get_accelerator
import torch.distributed as dist
from torch.utils.data import DataLoader

from bertds.data.config import DataConfig
from bertds.data.corpus import CorpusSource, load_paragraphs
from bertds.data.examples import ExampleConfig, make_examples
from bertds.data.tokenizer import Vocab
from bertds.errors import UserError

PIPELINE_VERSION = 1  # bump when the example semantics change, so stale caches are not reused
CACHE_DIR_ENV = "BERTDS_CACHE_DIR"
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "bertds"))


@dataclass
class PreparedData:
    examples: datasets.Dataset
    vocab: Vocab
    path: Path
    from_cache: bool


def _tokenize_paragraphs(batch: dict, vocab: Vocab) -> dict:
    sentences = [s for paragraph in batch["sentences"] for s in paragraph]
    ids = iter(vocab.encode(sentences))
    return {"sentence_ids": [[next(ids) for _ in paragraph] for paragraph in batch["sentences"]]}


def build_examples(source: CorpusSource, config: ExampleConfig, split: str = "train",
                   min_freq: int = 5) -> tuple[datasets.Dataset, Vocab]:
    """Corpus -> paragraphs -> word vocabulary -> token ids -> NSP/MLM examples, all in memory."""
    paragraphs = load_paragraphs(source, split)
    vocab = Vocab.train_word_level((s for batch in paragraphs.iter(1000) for p in batch["sentences"] for s in p),
                                   min_freq=min_freq)
    paragraph_ids = paragraphs.map(_tokenize_paragraphs, batched=True, fn_kwargs={"vocab": vocab},
                                   remove_columns=["sentences"], keep_in_memory=True,
                                   new_fingerprint=f"ids-{vocab.fingerprint()}", desc="tokenizing")
    examples = make_examples(paragraph_ids, vocab, config)
    if len(examples) == 0:
        raise UserError(f"no sentence pair of {source.describe()} fits in max_len {config.max_len}; "
                        "raise --max-len or pass --truncate")
    return examples, vocab


def prepare_pretraining_data(source: CorpusSource, config: ExampleConfig, cache_dir: str | Path | None = None,
                             split: str = "train", min_freq: int = 5) -> PreparedData:
    """The examples from the cache when present, else built and cached (written to a temporary directory
    first and renamed, so an interrupted build never looks complete)."""
    recipe = {"version": PIPELINE_VERSION, "corpus": source.fingerprint(split), "split": split,
              "min_freq": min_freq, **asdict(config)}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"wikitext2-{split}-len{config.max_len}-{key}"
    if (path / MANIFEST).is_file():
        return PreparedData(datasets.load_from_disk(str(path / "examples")), Vocab.load(path), path, True)

    examples, vocab = build_examples(source, config, split, min_freq)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    examples.save_to_disk(str(tmp / "examples"))
    vocab.save(tmp)
    manifest = {**recipe, "source": source.describe(), "num_examples": len(examples), "vocab_size": len(vocab)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if path.exists() and not (path / MANIFEST).is_file():
        shutil.rmtree(path)  # an incomplete directory of ours (no manifest): never valid, safe to replace
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same build first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(datasets.load_from_disk(str(path / "examples")), Vocab.load(path), path, False)


def prepare_for_training(config: DataConfig, rank: int) -> PreparedData:
    """Rank 0 builds the cache (if missing) while the other ranks wait; then every rank memory-maps it."""
    source = CorpusSource.resolve(config.data_dir)
    examples = ExampleConfig(max_len=config.max_len, seed=config.seed, truncate=config.truncate)
    if rank == 0:
        prepare_pretraining_data(source, examples, config.cache_dir)
    if dist.is_initialized():
        dist.barrier()
    return prepare_pretraining_data(source, examples, config.cache_dir)


class PretrainingBatches:
    """Endless micro-batches from one rank's contiguous shard of the examples, reshuffled every epoch with a
    generator seeded by (seed, epoch): the same seed gives the same order on every run. ``state_dict`` holds the
    position (epoch, batches consumed in it), so a resumed run continues with exactly the next batch."""

    def __init__(self, examples: datasets.Dataset, micro_batch: int, rank: int, world_size: int,
                 seed: int = 0, num_workers: int = 0):
        self.shard = split_dataset_by_node(examples, rank=rank, world_size=world_size).with_format("torch")
        if len(self.shard) < micro_batch:
            raise UserError(f"rank {rank} holds {len(self.shard)} examples, fewer than the micro batch "
                            f"{micro_batch}; lower the batch size or use a larger corpus")
        self.micro_batch, self.seed, self.num_workers = micro_batch, seed, num_workers
        self.epoch, self.batches_done = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.shard) // self.micro_batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shard), generator=generator).tolist()
        return [order[i * self.micro_batch:(i + 1) * self.micro_batch] for i in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            remaining = self._epoch_batches(self.epoch)[self.batches_done:]
            # batch_size=None: each sampled index list is fetched with one Arrow take, already stacked.
            # A private generator: creating an iterator must not draw from the global torch RNG (dropout's),
            # or a run resumed mid-epoch would see different dropout masks than one never interrupted.
            loader = DataLoader(self.shard, sampler=remaining, batch_size=None, num_workers=self.num_workers,
                                pin_memory=get_accelerator().device_name() != "cpu",
                                generator=torch.Generator().manual_seed(self.seed))
            for batch in loader:
                self.batches_done += 1
                yield batch
            self.epoch, self.batches_done = self.epoch + 1, 0
