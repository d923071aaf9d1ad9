"""Fine-tune a pretrained BERT on SNLI (entailment / neutral / contradiction) with DeepSpeed.

    deepspeed launcher/finetune_snli.py --checkpoint runs/pretrain --data-dir DIR      # snli_1.0_*.jsonl/.txt
    deepspeed launcher/finetune_snli.py --init-from-hf bert-base-uncased/               # the hub's stanfordnlp/snli
    deepspeed launcher/finetune_snli.py --checkpoint runs/pretrain --data-dir ../shared/data/snli \\
        --train-split dev --eval-splits test                                         # no SNLI train split at hand
"""

import argparse
import sys
from pathlib import Path

import deepspeed

from bertds.errors import run_cli
from bertds.options import add_options, from_args
from bertds.tasks.finetune import FinetuneConfig, main

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "finetune_snli.json"


def parse_args(argv=None) -> FinetuneConfig:
    """The config of the command line; a bad value raises a UserError (argparse exits 2 on a malformed one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, FinetuneConfig)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    return from_args(FinetuneConfig, args, deepspeed_config=args.deepspeed_config or str(DEFAULT_DS_CONFIG))


def cli(argv=None) -> int:
    return run_cli(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
