"""Prepare pretraining examples once (Arrow shards + manifest + tokenizer) for any number of training runs.

    python launcher/prepare_data.py --corpus wikitext-103 --data-dir DATA --tokenizer wordpiece --recipe bert \\
        --max-len 128 --out data/wt103-128
    python launcher/pretrain.py --prepared data/wt103-128 --max-len 128 ...

Bad input (missing or empty corpus, no usable paragraph, unknown tokenizer file) prints one ``error:`` line and
exits with code 2; nothing is left at --out unless it is complete.
"""

import argparse
import sys
import time
from pathlib import Path

from bertds.data.config import add_data_arguments, check_writable_dir, data_config_from_args
from bertds.data.corpus import resolve_corpus
from bertds.data.prepare import TokenizerChoice, default_cache_dir, example_config, prepare_directory
from bertds.errors import UserError, run_cli
from bertds.evaluate import add_eval_arguments, eval_config_from_args, prepare_heldout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write (must not exist, or hold the same data)")
    add_data_arguments(p)
    add_eval_arguments(p, interval=False)
    args = p.parse_args(argv)
    return run_cli(lambda: prepare(args))


def prepare(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    config = data_config_from_args(args)
    if config.prepared:
        raise UserError("--prepared names data to train on; prepare_data.py writes to --out")
    out = Path(args.out)
    check_writable_dir(out.parent, "--out")
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    corpus = resolve_corpus(config.corpus, config.data_dir, config.split)
    data = prepare_directory(
        corpus,
        TokenizerChoice(config.tokenizer, config.vocab_size, config.min_freq),
        example_config(config),
        out,
        config.streaming,
        cache,
    )
    heldout = prepare_heldout(config, data, eval_config_from_args(args))
    manifest = data.manifest or {}
    print(
        f"{'reused' if data.from_cache else 'prepared'} {manifest.get('num_examples')} examples "
        f"(max_len {manifest.get('max_len')}, {manifest.get('recipe')} recipe, {manifest.get('masking')} masking, "
        f"vocabulary {len(data.vocab)}) from {manifest.get('source')} in {time.perf_counter() - start:.1f} s "
        f"-> {data.path}"
    )
    if heldout is not None:
        print(f"held-out: {len(heldout.examples)} examples ({args.eval_split}, masks at 15%) -> {heldout.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
