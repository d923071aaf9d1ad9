"""Prepared pretraining data for training: built once (or read from the cache / a prepared directory),
memory-mapped, split into disjoint rank shards, served as fixed-shape micro-batches."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, Dataset

from bertds.data.config import DataConfig
from bertds.data.corpus import Corpus, CorpusSource, resolve_corpus
from bertds.data.examples import ExampleConfig
from bertds.data.masking import HashedUniforms, MaskingSpec, mask_tokens
from bertds.data.prepare import (DYNAMIC_MASKING_ATTR, MANIFEST, PreparedData, TokenizerChoice, _as_corpus,
                                 _check_recipe, bert_chunks, cache_path, d2l_columns, finish, in_memory_dataset,
                                 load_prepared, obtain_vocab, prepare_directory, recipe_of, write_examples)
from bertds.data.tokenizer import Vocab
from bertds.errors import UserError

CACHE_DIR_ENV = "BERTDS_CACHE_DIR"

__all__ = ["PreparedData", "PretrainingBatches", "build_examples", "default_cache_dir", "prepare_for_training",
           "prepare_pretraining_data", "rank_range"]


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "bertds"))


def build_examples(source: Corpus | CorpusSource, config: ExampleConfig, split: str = "train",
                   min_freq: int = 5, tokenizer: str = "word", vocab_size: int = 30522,
                   streaming: bool = False) -> tuple[datasets.Dataset, Vocab]:
    """Corpus -> vocabulary -> token ids -> examples, all in memory (no cache)."""
    corpus, choice = _as_corpus(source, split), TokenizerChoice(tokenizer, vocab_size, min_freq)
    if config.recipe == "d2l":
        columns, vocab = d2l_columns(corpus, None, choice, config, None)
        parts = [columns]
    else:
        _check_recipe(config, streaming)
        vocab = obtain_vocab(corpus, choice, None)
        parts = list(bert_chunks(corpus, vocab, config, streaming))
    if sum(len(part["tokens"]) for part in parts) == 0:
        raise UserError(f"no sentence pair of {corpus.describe()} fits in max_len {config.max_len}; "
                        "raise --max-len or pass --truncate")
    columns = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return in_memory_dataset(columns, config), vocab


def prepare_pretraining_data(source: Corpus | CorpusSource, config: ExampleConfig,
                             cache_dir: str | Path | None = None, split: str = "train", min_freq: int = 5,
                             tokenizer: str = "word", vocab_size: int = 30522,
                             streaming: bool = False) -> PreparedData:
    """The examples from the cache when present, else prepared into it (one process)."""
    corpus, choice = _as_corpus(source, split), TokenizerChoice(tokenizer, vocab_size, min_freq)
    cache = Path(cache_dir or default_cache_dir())
    return prepare_directory(corpus, choice, config, cache_path(corpus, choice, config, cache), streaming, cache)


def example_config(config: DataConfig) -> ExampleConfig:
    # --sentence-task none trains without the sentence loss on the same examples as nsp.
    sentence_task = "nsp" if config.sentence_task == "none" else config.sentence_task
    return ExampleConfig(max_len=config.max_len, seed=config.seed, truncate=config.truncate, recipe=config.recipe,
                         sentence_task=sentence_task, short_seq_prob=config.short_seq_prob,
                         max_predictions_per_seq=config.max_predictions, whole_word_masking=config.whole_word_masking,
                         dynamic_masking=config.masking == "dynamic", dupe_factor=config.dupe_factor,
                         mask_prob=config.mask_prob)


def _check_prepared_matches(data: PreparedData, config: DataConfig) -> None:
    """A prepared directory fixes the tokenizer and max_len; flags asking for others are refused."""
    manifest = data.manifest or {}
    if manifest.get("max_len") != config.max_len:
        raise UserError(f"--prepared {data.path} holds max_len {manifest.get('max_len')} examples, not --max-len "
                        f"{config.max_len}; pass --max-len {manifest.get('max_len')} or prepare the data again")
    if config.tokenizer not in ("word", "wordpiece"):
        wanted = Vocab.from_file(config.tokenizer)
        if wanted.fingerprint() != data.vocab.fingerprint():
            raise UserError(f"--prepared {data.path} was tokenized with another tokenizer than --tokenizer "
                            f"{config.tokenizer}; drop --tokenizer or prepare the data with it")
    elif config.tokenizer != "word" and manifest.get("tokenizer", {}).get("kind") != config.tokenizer:
        raise UserError(f"--prepared {data.path} was tokenized with {manifest.get('tokenizer')}, not --tokenizer "
                        f"{config.tokenizer}; drop --tokenizer or prepare the data with it")


def prepare_for_training(config: DataConfig, rank: int) -> PreparedData:
    """Rank 0 builds the cache (if missing) while the other ranks wait; then every rank memory-maps it. With
    ``--streaming`` every rank prepares its own disjoint part of the corpus into one shared directory."""
    if config.prepared:
        data = load_prepared(config.prepared)
        _check_prepared_matches(data, config)
        return data
    corpus = resolve_corpus(config.corpus, config.data_dir, config.split)
    choice = TokenizerChoice(config.tokenizer, config.vocab_size, config.min_freq)
    examples = example_config(config)
    cache = Path(config.cache_dir or default_cache_dir())
    path = cache_path(corpus, choice, examples, cache)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if not (config.streaming and world_size > 1):
        if rank == 0:
            prepare_directory(corpus, choice, examples, path, config.streaming, cache)
        if dist.is_initialized():
            dist.barrier()
        return load_prepared(path, from_cache=True)
    if not (path / MANIFEST).is_file():  # every rank reads world_size-th of the documents
        vocab = obtain_vocab(corpus, choice, cache) if rank == 0 else None
        dist.barrier()
        vocab = vocab or obtain_vocab(corpus, choice, cache)
        nonce = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(nonce, src=0)
        tmp = path.with_name(f"{path.name}.tmp-{nonce[0]}")
        write_examples(tmp, corpus, vocab, choice, examples, True, cache, rank, world_size)
        dist.barrier()
        if rank == 0:
            try:
                finish(tmp, path, corpus, vocab, examples, recipe_of(corpus, choice, examples), True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return load_prepared(path, from_cache=True)


def table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """Arrow columns as numpy arrays, fixed-size lists as 2-D (datasets' numpy formatter converts per row)."""
    columns = {}
    for name, column in zip(table.column_names, table.columns):
        array = column.combine_chunks()
        if pa.types.is_fixed_size_list(array.type):
            columns[name] = array.flatten().to_numpy().reshape(len(array), array.type.list_size)
        else:
            columns[name] = array.to_numpy()
    return columns


def rank_range(num_examples: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of the examples: sizes differ by at most one, together they are all."""
    base, extra = divmod(num_examples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class _MaskingShard(Dataset):
    """Fetches one micro-batch (an index list) with a single Arrow take; with dynamic masking draws its masks
    from (seed, epoch, global example index)."""

    def __init__(self, shard: datasets.Dataset, offset: int, masking: MaskingSpec | None, seed: int):
        if shard._indices is not None:  # rows in the order of the Arrow table
            shard = shard.flatten_indices()
        # datasets' Table: pickled to worker processes by file path (memory-mapped), not by value.
        self.rows, self.offset, self.masking, self.seed = shard.data, offset, masking, seed

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, key: tuple[int, list[int]]) -> dict[str, torch.Tensor]:
        epoch, indices = key
        batch = table_columns(self.rows.table.take(pa.array(indices, type=pa.int64())))  # one Arrow gather
        if self.masking is not None:
            index = np.asarray(indices, dtype=np.int64) + self.offset
            tokens = batch["tokens"].copy()
            masks = mask_tokens(tokens, batch["segments"], batch["valid_len"], self.masking,
                                HashedUniforms(self.seed, epoch, index))
            batch = {**batch, "tokens": tokens, **masks}
        # Integer columns as int64, as gathers and the NSP loss index with them.
        return {k: torch.from_numpy(np.array(v, dtype=np.int64 if v.dtype.kind == "i" else v.dtype))
                for k, v in batch.items()}


class PretrainingBatches:
    """Endless micro-batches from one rank's contiguous shard of the examples, reshuffled every epoch with a
    generator seeded by (seed, epoch): the same seed gives the same order on every run. ``state_dict`` holds the
    position (epoch, batches consumed in it), so a resumed run continues with exactly the next batch. With
    dynamic masking (``masking``, or the spec ``prepare_for_training`` attached to the examples) the masks are
    drawn per batch from (seed, epoch, example index): also exact on resume."""

    def __init__(self, examples: datasets.Dataset, micro_batch: int, rank: int, world_size: int,
                 seed: int = 0, num_workers: int = 0, masking: MaskingSpec | None = None):
        share = rank_range(len(examples), rank, world_size)
        self.shard = examples.select(share).with_format("arrow")
        if len(self.shard) < micro_batch:
            raise UserError(f"rank {rank} holds {len(self.shard)} examples, fewer than the micro batch "
                            f"{micro_batch}; lower the batch size or use a larger corpus")
        self.masking = masking if masking is not None else getattr(examples, DYNAMIC_MASKING_ATTR, None)
        self.offset = share.start
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
        source = _MaskingShard(self.shard, self.offset, self.masking, self.seed)
        while True:
            remaining = [(self.epoch, b) for b in self._epoch_batches(self.epoch)[self.batches_done:]]
            # batch_size=None: each sampled index list is one already-stacked batch.
            # A private generator: creating an iterator must not draw from the global torch RNG (dropout's),
            # or a run resumed mid-epoch would see different dropout masks than one never interrupted.
            loader = DataLoader(source, sampler=remaining, batch_size=None, num_workers=self.num_workers,
                                pin_memory=get_accelerator().device_name() != "cpu",
                                prefetch_factor=4 if self.num_workers else None,
                                generator=torch.Generator().manual_seed(self.seed))
            for batch in loader:
                self.batches_done += 1
                yield batch
            self.epoch, self.batches_done = self.epoch + 1, 0
