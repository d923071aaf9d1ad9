"""Prepared examples served for training: one rank's contiguous shard, fixed-shape micro-batches in a seeded
order that resumes exactly, dynamic masks drawn per batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from bertds.data.masking import HashedUniforms, MaskingSpec, mask_tokens
from bertds.errors import UserError

if TYPE_CHECKING:
    import datasets

__all__ = ["BatchSource", "PretrainingBatches", "RecordBatches", "rank_range", "table_columns"]


def pin_memory() -> bool:
    """Page-locked batches, for a copy to an accelerator that overlaps compute."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


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


class RecordBatches:
    """Row gathers from a table of several record batches (memory-mapped shards), one ``take`` per record batch
    that holds requested rows: Arrow's ``Table.take`` on a chunked table works over every chunk of each column,
    and its cost grows with the table, not with the rows taken."""

    def __init__(self, table: pa.Table):
        self.batches = table.to_batches()  # zero-copy views of the table's chunks
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])

    def take(self, indices: np.ndarray) -> pa.Table:
        """The rows ``indices`` (global row numbers), in that order."""
        chunk = np.searchsorted(self.starts, indices, side="right") - 1
        by_chunk = np.argsort(chunk, kind="stable")
        bounds = np.searchsorted(chunk[by_chunk], np.arange(len(self.batches) + 1))
        parts = [
            self.batches[k].take(pa.array(indices[by_chunk[lo:hi]] - self.starts[k]))
            for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
            if hi > lo
        ]
        gathered = pa.Table.from_batches(parts, schema=self.batches[0].schema).combine_chunks()
        return gathered.take(pa.array(np.argsort(by_chunk)))  # back to the requested order


class BatchSource(Dataset):
    """Fetches one micro-batch (an index list) in one gather per record batch; with dynamic masking draws its masks
    from (seed, epoch, global example index)."""

    def __init__(self, shard: datasets.Dataset, offset: int, masking: MaskingSpec | None, seed: int):
        if shard._indices is not None:  # rows in the order of the Arrow table
            shard = shard.flatten_indices()
        # datasets' Table: pickled to worker processes by file path (memory-mapped), not by value.
        self.rows, self.offset, self.masking, self.seed = shard.data, offset, masking, seed
        self.record_batches: RecordBatches | None = None  # built in the process that reads, never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "record_batches": None}

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, key: tuple[int, list[int]]) -> dict[str, torch.Tensor]:
        epoch, indices = key
        if self.record_batches is None:
            self.record_batches = RecordBatches(self.rows.table)
        batch = table_columns(self.record_batches.take(np.asarray(indices, dtype=np.int64)))
        if self.masking is not None:
            index = np.asarray(indices, dtype=np.int64) + self.offset
            tokens = batch["tokens"].copy()
            masks = mask_tokens(
                tokens, batch["segments"], batch["valid_len"], self.masking, HashedUniforms(self.seed, epoch, index)
            )
            batch = {**batch, "tokens": tokens, **masks}
        # Integer columns as int64, as gathers and the NSP loss index with them.
        return {
            k: torch.from_numpy(np.array(v, dtype=np.int64 if v.dtype.kind == "i" else v.dtype))
            for k, v in batch.items()
        }


class PretrainingBatches:
    """Endless micro-batches from one rank's contiguous shard of the examples, reshuffled every epoch with a
    generator seeded by (seed, epoch): the same seed gives the same order on every run. ``state_dict`` holds the
    position (epoch, batches consumed in it), so a resumed run continues with exactly the next batch. With
    dynamic masking (``masking``: ``PreparedData.masking``) the masks are
    drawn per batch from (seed, epoch, example index): also exact on resume."""

    def __init__(
        self,
        examples: datasets.Dataset,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        num_workers: int = 0,
        masking: MaskingSpec | None = None,
    ):
        share = rank_range(len(examples), rank, world_size)
        self.shard = examples.select(share).with_format("arrow")
        if len(self.shard) < micro_batch:
            raise UserError(
                f"rank {rank} holds {len(self.shard)} examples, fewer than the micro batch "
                f"{micro_batch}; lower the batch size or use a larger corpus"
            )
        self.masking = masking
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
        return [order[i * self.micro_batch : (i + 1) * self.micro_batch] for i in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        source = BatchSource(self.shard, self.offset, self.masking, self.seed)
        while True:
            remaining = [(self.epoch, b) for b in self._epoch_batches(self.epoch)[self.batches_done :]]
            # batch_size=None: each sampled index list is one already-stacked batch.
            # A private generator: creating an iterator must not draw from the global torch RNG (dropout's),
            # or a run resumed mid-epoch would see different dropout masks than one never interrupted.
            loader = DataLoader(
                source,
                sampler=remaining,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=pin_memory(),
                prefetch_factor=4 if self.num_workers else None,
                generator=torch.Generator().manual_seed(self.seed),
            )
            for batch in loader:
                self.batches_done += 1
                yield batch
            self.epoch, self.batches_done = self.epoch + 1, 0
