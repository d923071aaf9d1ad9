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

from bertds.tasks.finetune import FinetuneConfig, main
from bertds.tasks.nli import SPLITS

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "finetune_snli.json"


def parse_args(argv=None) -> FinetuneConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a pretraining run's --output-dir, or a DeepSpeed checkpoint of it")
    source.add_argument("--init-from-hf", help="a Hugging Face BERT directory (e.g. bert-base-uncased)")
    p.add_argument("--data-dir", help="directory with SNLI's snli_1.0_{train,dev,test}.jsonl or .txt, or "
                                      "{split}.tsv (label<TAB>premise<TAB>hypothesis); default: the hub")
    p.add_argument("--train-split", default="train", choices=SPLITS)
    p.add_argument("--eval-splits", nargs="+", default=["dev", "test"], choices=SPLITS,
                   help="evaluated after every epoch; the best model is chosen on the first")
    p.add_argument("--max-len", type=int, default=128, help="tokens per pair, <cls>/<sep> included; longer pairs "
                                                            "are cut, longest sentence first")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, help="global pairs per optimizer step; default: from the JSON")
    p.add_argument("--lr", type=float, help="learning rate; default: from the JSON")
    p.add_argument("--max-train-pairs", type=int, help="train on a random subset of this many pairs")
    p.add_argument("--max-eval-pairs", type=int, help="evaluate on a random subset of this many pairs per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/finetune_snli", help="metrics.jsonl, best/, finetune_config.json")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    return FinetuneConfig(
        deepspeed_config=args.deepspeed_config or str(DEFAULT_DS_CONFIG), checkpoint=args.checkpoint,
        init_from_hf=args.init_from_hf, data_dir=args.data_dir, train_split=args.train_split,
        eval_splits=tuple(args.eval_splits), max_len=args.max_len, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, max_train_pairs=args.max_train_pairs, max_eval_pairs=args.max_eval_pairs, seed=args.seed,
        output_dir=args.output_dir)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
