"""Data options of the pretraining command line, as a typed config."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class DataConfig:
    data_dir: str | None = None  # None: env BERTDS_DATA_DIR, else the Hugging Face hub
    cache_dir: str | None = None  # None: env BERTDS_CACHE_DIR, else ~/.cache/bertds
    max_len: int = 64
    seed: int = 0
    truncate: bool = False  # False: drop over-long pairs (d2l); True: cut the longer sentence first
    num_workers: int = 0


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", help="directory with wiki.{train,valid,test}.tokens; default: env "
                                          "BERTDS_DATA_DIR, else the Hugging Face hub")
    group.add_argument("--cache-dir", help="prepared-example cache; default: env BERTDS_CACHE_DIR or ~/.cache/bertds")
    group.add_argument("--max-len", type=int, default=64, help="tokens per sentence pair, incl. <cls>/<sep>")
    group.add_argument("--seed", type=int, default=0, help="data order, masking and initialisation seed")
    group.add_argument("--truncate", action="store_true", help="truncate over-long pairs instead of dropping them")
    group.add_argument("--num-workers", type=int, default=0, help="data loader worker processes per rank")
    return parser


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    return DataConfig(data_dir=args.data_dir, cache_dir=args.cache_dir, max_len=args.max_len, seed=args.seed,
                      truncate=args.truncate, num_workers=args.num_workers)
