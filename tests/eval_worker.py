"""Launched by tests/test_evaluate.py with several ranks: scores the first examples of a prepared directory with a
seeded tiny model through DeepSpeed engines (ZeRO stages from argv) and prints rank 0's metrics as JSON lines.

    python -m torch.distributed.run --nproc_per_node 2 tests/eval_worker.py PREPARED_DIR NUM_EXAMPLES STAGE...
"""

import json
import sys

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from bertds.data import load_prepared
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.evaluate import score
from bertds.model import BertForPreTraining, get_config

MICRO_BATCH = 4


def seeded_model(vocab_size: int) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(get_config("tiny", vocab_size=vocab_size))


def main() -> None:
    path, count, stages = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
    rank, world_size = init_distributed()
    data = load_prepared(path)
    examples = data.examples.select(range(count))
    device = torch.device(get_accelerator().current_device_name())
    for stage in stages:
        model = seeded_model(len(data.vocab))
        config = {
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        }
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        metrics = score(engine, examples, MICRO_BATCH, device, rank=rank, world_size=world_size)
        if rank == 0:
            print("METRICS " + json.dumps({"stage": stage, **metrics}), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
