"""Pretrain BERT (MLM + NSP) on WikiText-2 with DeepSpeed.

deepspeed launcher/pretrain.py --data-dir ../shared/data/wikitext-2
deepspeed --num_gpus 2 launcher/pretrain.py --deepspeed_config ds_configs/tiny_cpu.json --max-steps 100
python -m bertds.supervise -- deepspeed --num_gpus 2 launcher/pretrain.py ...   # SIGTERM-safe wrapper
"""

import argparse
import os
import sys
from pathlib import Path

# Read once, when torch loads its OpenMP runtime: threads that finish their share of a parallel region sleep instead
# of spinning, so on a shared or oversubscribed CPU they leave the cores to the threads that still have work (a
# spinning thread holds the core its descheduled partner needs). Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import deepspeed

from bertds.data import add_data_arguments, data_config_from_args
from bertds.engine.train import TrainConfig, main
from bertds.errors import run_cli
from bertds.evaluate import add_eval_arguments, eval_config_from_args
from bertds.options import add_options, from_args

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "tiny_cpu.json"


def parse_args(argv=None) -> TrainConfig:
    """The config of the command line; a bad value raises a UserError (argparse exits 2 on a malformed one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainConfig)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    add_data_arguments(p)
    add_eval_arguments(p)
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    return from_args(
        TrainConfig,
        args,
        deepspeed_config=args.deepspeed_config or str(DEFAULT_DS_CONFIG),
        data=data_config_from_args(args),
        eval=eval_config_from_args(args),
    )


def cli(argv=None) -> int:
    return run_cli(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
