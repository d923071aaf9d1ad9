"""Pretrain BERT (MLM + NSP) on WikiText-2 with DeepSpeed.

    deepspeed launcher/pretrain.py --data-dir ../shared/data/wikitext-2
    deepspeed --num_gpus 2 launcher/pretrain.py --deepspeed_config ds_configs/tiny_cpu.json --max-steps 100
"""
import argparse
import sys
from pathlib import Path

import deepspeed

from bertds.data import add_data_arguments, data_config_from_args
from bertds.engine.train import TrainConfig, main
from bertds.evaluate import add_eval_arguments, eval_config_from_args
from bertds.model import MODEL_PRESETS

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "tiny_cpu.json"


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--batch-size", type=int, help="global batch (sentence pairs per step); default: from the JSON")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--lr", type=float, help="peak learning rate; default: from the JSON")
    p.add_argument("--output-dir", default="runs/pretrain", help="where the model, vocabulary and metrics go")
    p.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
    p.add_argument("--dropout", type=float, help="override the preset's dropout")
    p.add_argument("--untie-embeddings", action="store_true", help="separate MLM decoder and token embedding")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute encoder blocks in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the model through engine.compile()")
    p.add_argument("--pre-ln", action="store_true", help="pre-LayerNorm blocks plus a final LayerNorm (stable at "
                                                         "higher learning rates; not exportable to Hugging Face)")
    p.add_argument("--init-from", help="start from the weights of a finished run's --output-dir (two-phase)")
    p.add_argument("--init-from-hf", help="start from a Hugging Face BERT directory (its config and weights; the "
                                          "data must use its tokenizer)")
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    ckpt.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    ckpt.add_argument("--resume", help="'auto' (latest checkpoint in --output-dir, if any) or a checkpoint path")
    ckpt.add_argument("--trust-checkpoint", action="store_true", help="resume from checkpoint files that need full "
                      "unpickling (which can run code): only for checkpoints from a source you trust")
    ckpt.add_argument("--overwrite", action="store_true", help="allow an --output-dir that holds another run")
    track = p.add_argument_group("tracking")
    track.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    track.add_argument("--wandb-project", default="bertds")
    track.add_argument("--wandb-run-name")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    add_data_arguments(p)
    add_eval_arguments(p)
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    return TrainConfig(
        deepspeed_config=args.deepspeed_config or str(DEFAULT_DS_CONFIG), data=data_config_from_args(args),
        model=args.model, batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr,
        output_dir=args.output_dir, log_interval=args.log_interval, dropout=args.dropout,
        untie_embeddings=args.untie_embeddings, activation_checkpointing=args.activation_checkpointing,
        compile=args.compile, init_from=args.init_from, init_from_hf=args.init_from_hf,
        save_interval=args.save_interval, keep_last=args.keep_last,
        resume=args.resume, trust_checkpoint=args.trust_checkpoint, overwrite=args.overwrite,
        wandb=not args.no_wandb, wandb_project=args.wandb_project,
        wandb_run_name=args.wandb_run_name, eval=eval_config_from_args(args), pre_ln=args.pre_ln)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
