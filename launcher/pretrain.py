"""Pretrain BERT (MLM + NSP) on WikiText-2 with DeepSpeed.

    deepspeed launcher/pretrain.py --data-dir ../shared/data/wikitext-2
    deepspeed --num_gpus 2 launcher/pretrain.py --deepspeed_config ds_configs/tiny_cpu.json --max-steps 100
"""
import argparse
import sys
from pathlib import Path

import deepspeed

from bertds.model import MODEL_PRESETS
from bertds.train import TrainConfig, main

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "tiny_cpu.json"


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--max-len", type=int, default=64, help="tokens per sentence pair, incl. <cls>/<sep>")
    p.add_argument("--batch-size", type=int, help="global batch (sentence pairs per step); default: from the JSON")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--lr", type=float, help="peak learning rate; default: from the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="directory with wiki.{train,valid,test}.tokens; default: env "
                                      "BERTDS_DATA_DIR, else the Hugging Face hub")
    p.add_argument("--cache-dir", help="prepared-example cache; default: env BERTDS_CACHE_DIR or ~/.cache/bertds")
    p.add_argument("--output-dir", default="runs/pretrain", help="where the model, vocabulary and metrics go")
    p.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
    p.add_argument("--truncate", action="store_true", help="truncate over-long pairs instead of dropping them")
    p.add_argument("--dropout", type=float, help="override the preset's dropout")
    p.add_argument("--untie-embeddings", action="store_true", help="separate MLM decoder and token embedding")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute encoder blocks in backward")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes per rank")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    return TrainConfig(
        deepspeed_config=args.deepspeed_config or str(DEFAULT_DS_CONFIG), model=args.model, max_len=args.max_len,
        batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr, seed=args.seed, data_dir=args.data_dir,
        cache_dir=args.cache_dir, output_dir=args.output_dir, log_interval=args.log_interval,
        truncate=args.truncate, dropout=args.dropout, untie_embeddings=args.untie_embeddings,
        activation_checkpointing=args.activation_checkpointing, num_workers=args.num_workers)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
