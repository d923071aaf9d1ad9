"""Batches (bertds/data/loader.py): rank shards, per-epoch shuffling, resuming at a batch."""

import datasets
import numpy as np
import pyarrow as pa
import pytest

from bertds.data import (
    ExampleConfig,
    PretrainingBatches,
)
from bertds.data.loader import RecordBatches, rank_range, table_columns
from bertds.data.shards import in_memory_dataset
from tests.conftest import as_numpy, columns


def test_rank_shards_are_disjoint_and_cover_the_data(prepared):
    seen = []
    for rank in range(2):
        shard = PretrainingBatches(prepared.examples, 64, rank, 2).shard
        seen.append(set(map(tuple, table_columns(shard.data.table)["tokens"].tolist())))
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == len(set(map(tuple, as_numpy(prepared.examples)["tokens"].tolist())))


def test_batches_are_fixed_size_and_reshuffled_each_epoch(prepared):
    small = prepared.examples.select(range(100))
    batches = iter(PretrainingBatches(small, 32, 0, 1, seed=1))
    epoch0 = [next(batches) for _ in range(3)]
    epoch1 = [next(batches) for _ in range(3)]
    assert all(b["tokens"].shape == (32, 64) for b in epoch0 + epoch1)
    assert not all((x["tokens"] == y["tokens"]).all() for x, y in zip(epoch0, epoch1))
    replay = iter(PretrainingBatches(small, 32, 0, 1, seed=1))
    assert all((next(replay)["tokens"] == b["tokens"]).all() for b in epoch0)


def test_batch_position_round_trips_for_resume(prepared):
    small = prepared.examples.select(range(100))
    reference = iter(PretrainingBatches(small, 32, 0, 1, seed=2))
    expected = [next(reference)["tokens"] for _ in range(7)]  # crosses two epoch boundaries (3 batches each)
    first = PretrainingBatches(small, 32, 0, 1, seed=2)
    stream = iter(first)
    for _ in range(4):
        next(stream)
    assert first.state_dict() == {"epoch": 1, "batches_done": 1}
    resumed = PretrainingBatches(small, 32, 0, 1, seed=2)
    resumed.load_state_dict(first.state_dict())
    stream = iter(resumed)
    assert all((next(stream)["tokens"] == t).all() for t in expected[4:])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_are_disjoint_and_complete(world_size):
    n = 100
    examples = in_memory_dataset(
        {
            "tokens": np.arange(n * 4, dtype=np.int32).reshape(n, 4),
            "segments": np.zeros((n, 4), np.int8),
            "valid_len": np.full(n, 4, np.int32),
            "nsp_label": np.zeros(n, np.int8),
        },
        ExampleConfig(max_len=4, dynamic_masking=True),
    )
    seen = []
    for rank in range(world_size):
        batches = PretrainingBatches(examples, 5, rank, world_size, seed=3)
        ids = columns(batches.shard)["tokens"][:, 0] // 4
        assert ids.tolist() == list(rank_range(n, rank, world_size))
        seen += ids.tolist()
        stream = iter(batches)
        epochs = [
            [int(i) for _ in range(batches.batches_per_epoch) for i in next(stream)["tokens"][:, 0] // 4]
            for _ in range(2)
        ]
        assert epochs[0] != epochs[1] and set(epochs[0]) <= set(ids.tolist())  # reshuffled per epoch
        replay = iter(PretrainingBatches(examples, 5, rank, world_size, seed=3))
        replayed = [int(i) for _ in range(batches.batches_per_epoch) for i in next(replay)["tokens"][:, 0] // 4]
        assert replayed == epochs[0]
    assert sorted(seen) == list(range(n))  # every example on exactly one rank


def numbered_examples(n: int) -> dict[str, np.ndarray]:
    """Examples whose first token is 4 * their index."""
    return {
        "tokens": np.arange(n * 4, dtype=np.int32).reshape(n, 4),
        "segments": np.zeros((n, 4), np.int8),
        "valid_len": np.full(n, 4, np.int32),
        "nsp_label": np.zeros(n, np.int8),
    }


def test_rows_are_gathered_across_record_batches_in_the_requested_order():
    rows = numbered_examples(50)
    table = pa.Table.from_batches(
        [
            pa.RecordBatch.from_pydict({k: v[lo:hi].tolist() for k, v in rows.items()})
            for lo, hi in [(0, 7), (7, 30), (30, 50)]
        ]
    )
    indices = np.random.default_rng(0).integers(0, 50, 40)  # unsorted, with repeats, from every record batch
    gathered = RecordBatches(table).take(indices)
    assert gathered.equals(table.take(pa.array(indices)).combine_chunks())
    assert [t[0] // 4 for t in gathered.column("tokens").to_pylist()] == indices.tolist()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_shard_spanning_several_record_batches_yields_exactly_its_rows(num_workers):
    config = ExampleConfig(max_len=4, dynamic_masking=True)
    parts = [in_memory_dataset(numbered_examples(30), config) for _ in range(3)]
    examples = datasets.concatenate_datasets(parts)  # rows 0-29 three times, as three record batches
    assert examples.data.table.column("tokens").num_chunks == 3
    batches = PretrainingBatches(examples, 5, 1, 2, seed=4, num_workers=num_workers)  # rows 45-89
    stream = iter(batches)
    epoch = [int(i) for _ in range(batches.batches_per_epoch) for i in next(stream)["tokens"][:, 0] // 4]
    expected = [i % 30 for i in range(45, 90)]
    assert sorted(epoch) == sorted(expected) and epoch != expected
