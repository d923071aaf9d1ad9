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
    corpus: list[str] | None = None  # None: WikiText-2 (data_dir); else see bertds.data.corpus.resolve_corpus
    split: str = "train"
    prepared: str | None = None  # a directory written by launcher/prepare_data.py
    streaming: bool = False
    tokenizer: str = "word"  # "word" (d2l), "wordpiece" (trained), or a vocab.txt / tokenizer.json path
    vocab_size: int = 30522
    min_freq: int = 5
    recipe: str = "d2l"  # "d2l" or "bert" (Google's create_pretraining_data)
    sentence_task: str = "nsp"  # "nsp", "sop", or "none" (MLM only; the examples are made as for nsp)
    short_seq_prob: float = 0.1
    max_predictions: int | None = None  # None: 15% of max_len (d2l); 20 at 128, 80 at 512 (bert)
    whole_word_masking: bool = False
    masking: str = "static"  # "static" (fixed at preparation) or "dynamic" (drawn every epoch)
    dupe_factor: int = 1
    mask_prob: float = 0.15  # share of each sequence's length predicted


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", help="directory with wiki.{train,valid,test}.tokens; default: env "
                                          "BERTDS_DATA_DIR, else the Hugging Face hub")
    group.add_argument("--cache-dir", help="prepared-example cache; default: env BERTDS_CACHE_DIR or ~/.cache/bertds")
    group.add_argument("--max-len", type=int, default=64, help="tokens per sentence pair, incl. <cls>/<sep>")
    group.add_argument("--seed", type=int, default=0, help="data order, masking and initialisation seed")
    group.add_argument("--truncate", action="store_true", help="truncate over-long pairs instead of dropping them")
    group.add_argument("--num-workers", type=int, default=0, help="data loader worker processes per rank")
    group.add_argument("--corpus", nargs="+", help="wikitext-2, wikitext-103 (-raw), .txt/.jsonl/.parquet files "
                                                  "or directories, or hub:NAME[:CONFIG]; default: WikiText-2")
    group.add_argument("--split", default="train", help="corpus split (WikiText and hub corpora)")
    group.add_argument("--prepared", help="a directory written by launcher/prepare_data.py (skips preparation)")
    group.add_argument("--streaming", action="store_true", help="read the corpus lazily (larger than memory); "
                                                                "each rank prepares a disjoint part")
    group.add_argument("--tokenizer", default="word", help="word (d2l), wordpiece (trained on the corpus), or a "
                                                          "BERT vocab.txt / tokenizer.json path")
    group.add_argument("--vocab-size", type=int, default=30522, help="WordPiece vocabulary size")
    group.add_argument("--min-freq", type=int, default=5, help="word vocabulary: minimum word count")
    group.add_argument("--recipe", default="d2l", choices=["d2l", "bert"],
                       help="example creation: d2l (sentence pairs of paragraphs) or bert (Google's: documents, "
                            "segments filled to max_len)")
    group.add_argument("--sentence-task", default="nsp", choices=["nsp", "sop", "none"],
                       help="next sentence (nsp) or sentence order (sop, ALBERT) prediction, sop needs --recipe "
                            "bert; none: MLM only (RoBERTa), no sentence loss")
    group.add_argument("--short-seq-prob", type=float, default=0.1, help="bert recipe: share of shorter targets")
    group.add_argument("--max-predictions", type=int, help="MLM slots per example; default 15%% of max_len "
                                                           "(d2l), 20 at 128 / 80 at 512 (bert)")
    group.add_argument("--whole-word-masking", action="store_true", help="mask all pieces of a word together")
    group.add_argument("--masking", default="static", choices=["static", "dynamic"],
                       help="static: masks fixed at preparation; dynamic: drawn every epoch (RoBERTa)")
    group.add_argument("--dupe-factor", type=int, default=1, help="static masking: copies with different masks")
    group.add_argument("--mask-prob", type=float, default=0.15,
                       help="share of each sequence's tokens predicted (MosaicBERT: 0.30); evaluation stays at 0.15")
    return parser


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    return DataConfig(data_dir=args.data_dir, cache_dir=args.cache_dir, max_len=args.max_len, seed=args.seed,
                      truncate=args.truncate, num_workers=args.num_workers, corpus=args.corpus, split=args.split,
                      prepared=args.prepared, streaming=args.streaming, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size, min_freq=args.min_freq, recipe=args.recipe,
                      sentence_task=args.sentence_task, short_seq_prob=args.short_seq_prob,
                      max_predictions=args.max_predictions, whole_word_masking=args.whole_word_masking,
                      masking=args.masking, dupe_factor=args.dupe_factor, mask_prob=args.mask_prob)
