"""bertds' data preparation against the d2l book's pure-Python reference (bench/d2l_data_reference.py), in one run,
on the same input: reading -> tokenizing -> NSP pairs -> MLM masking -> tensors ready, max_len 64, d2l recipe
(word vocabulary). Then the loader: max_len 128 WordPiece examples (original-BERT recipe) served from the cache.

    python bench/data_pipeline.py                       # WikiText-2 valid, train, and train repeated to >= 10M tokens
    python bench/data_pipeline.py --min-tokens 20000000 --bertds-runs 3
    python bench/data_pipeline.py --streaming-mb 500    # only: prepare_data.py --streaming, time and peak RSS

``--streaming-mb N`` instead runs ``launcher/prepare_data.py --streaming`` (original-BERT recipe, WordPiece, max_len
128, as for WikiText-103) on an N MB corpus of repeated WikiText-2 train lines in a temporary directory, and reports
its wall time and the peak resident memory of its process tree (polled every 0.1 s; shared pages count once per
process, so the figure is an upper bound).

Both sides run in this process, alternately, one after the other; the reference is timed ``--reference-runs``
times and bertds ``--bertds-runs`` times, and the ratio uses the medians. bertds uses its thread pool (Arrow and
numpy release the GIL); the reference is single-threaded Python, as written in the book.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.d2l_data_reference import load_data_wiki
from bertds.data import ExampleConfig, PretrainingBatches, build_examples, resolve_corpus
from bertds.data.loader import table_columns
from bertds.data.prepare import TokenizerChoice, prepare_directory
from bertds.data.tokenizer import DEFAULT_WORDPIECE_VOCAB
from bertds.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def bertds_tensors(path: Path, max_len: int) -> tuple[int, float]:
    start = time.perf_counter()
    examples, _ = build_examples(resolve_corpus([str(path)]), ExampleConfig(max_len=max_len))
    tensors = {k: torch.from_numpy(v.copy()) for k, v in table_columns(examples.data.table).items()}  # writable
    return len(tensors["tokens"]), time.perf_counter() - start


def reference_tensors(path: Path, max_len: int) -> tuple[int, float]:
    start = time.perf_counter()
    dataset = load_data_wiki(str(path), max_len)
    return len(dataset), time.perf_counter() - start


def count_tokens(path: Path) -> int:
    return sum(len(line.split()) for line in path.open(encoding="utf-8"))


def repeated_corpus(source: Path, min_tokens: int, directory: Path) -> Path:
    copies = math.ceil(min_tokens / count_tokens(source))
    target = directory / f"wiki.train.x{copies}.tokens"
    text = source.read_text(encoding="utf-8")
    target.write_text(text * copies, encoding="utf-8")
    return target


def compare(name: str, path: Path, max_len: int, reference_runs: int, bertds_runs: int) -> float:
    tokens = count_tokens(path)
    reference, ours = [], []
    for run in range(max(reference_runs, bertds_runs)):
        if run < reference_runs:
            n_ref, seconds = reference_tensors(path, max_len)
            reference.append(seconds)
        if run < bertds_runs:
            n_ours, seconds = bertds_tensors(path, max_len)
            ours.append(seconds)
    ref, own = statistics.median(reference), statistics.median(ours)
    print(
        f"{name:<28} {tokens / 1e6:6.2f}M tokens | reference {ref:7.2f} s ({n_ref} examples, "
        f"{n_ref / ref:8.0f}/s) | bertds {own:6.2f} s ({n_ours} examples, {n_ours / own:8.0f}/s; runs "
        f"{', '.join(f'{s:.2f}' for s in ours)}) | ratio {ref / own:5.1f}x",
        flush=True,
    )
    return ref / own


def loader_throughput(
    path: Path, cache: Path, vocab_size: int, micro_batch: int, batches: int, num_workers: int
) -> None:
    for masking in ("static", "dynamic"):
        config = ExampleConfig(max_len=128, recipe="bert", dynamic_masking=masking == "dynamic")
        start = time.perf_counter()
        data = prepare_directory(
            resolve_corpus([str(path)]),
            TokenizerChoice("wordpiece", vocab_size),
            config,
            cache / f"wordpiece-128-{masking}",
            cache_dir=cache,
        )
        prepared = time.perf_counter() - start
        stream = iter(
            PretrainingBatches(data.examples, micro_batch, 0, 1, seed=0, num_workers=num_workers, masking=data.masking)
        )
        next(stream)  # start-up (worker processes) is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(stream)
        seconds = time.perf_counter() - start
        assert batch["tokens"].shape == (micro_batch, 128)
        print(
            f"loader, WordPiece {vocab_size}, max_len 128, {masking:<7} masking: {len(data.examples)} examples "
            f"prepared in {prepared:.1f} s (tokenizer training included); {batches} batches of {micro_batch} from "
            f"the cache, {num_workers} workers: {batches * micro_batch / seconds:,.0f} examples/s",
            flush=True,
        )


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def streaming_memory(source: Path, megabytes: int, tokenizer: str, max_len: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bertds-streaming-") as tmp:
        corpus = Path(tmp) / "wiki.train.tokens"  # a WikiText file: " = Title = " documents
        text = source.read_bytes()
        with corpus.open("wb") as f:
            for _ in range(math.ceil(megabytes * 2**20 / len(text))):
                f.write(text)
        command = [
            sys.executable,
            str(REPO / "launcher" / "prepare_data.py"),
            "--corpus",
            str(corpus),
            "--streaming",
            "--recipe",
            "bert",
            "--tokenizer",
            tokenizer,
            "--max-len",
            str(max_len),
            "--out",
            str(Path(tmp) / "prepared"),
            "--cache-dir",
            str(Path(tmp) / "cache"),
        ]
        log = Path(tmp) / "log.txt"
        start, peak = time.perf_counter(), 0
        with log.open("wb") as out:
            process = psutil.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            while process.poll() is None:
                peak = max(peak, tree_rss(process))
                time.sleep(0.1)
        seconds = time.perf_counter() - start
        output = log.read_text().strip().splitlines()
        if process.returncode != 0:
            raise SystemExit("prepare_data.py failed:\n" + "\n".join(output[-20:]))
        largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kernel's peak, largest process
        print(
            f"streaming {corpus.stat().st_size / 2**20:.0f} MB ({tokenizer}, bert recipe, max_len {max_len}): "
            f"{seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB (process tree, sampled; largest process "
            f"{largest / 2**30:.2f} GiB) | {output[-1]}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--min-tokens", type=int, default=10_000_000, help="size of the repeated corpus")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--reference-runs", type=int, default=1)
    p.add_argument("--bertds-runs", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_WORDPIECE_VOCAB)
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--streaming-mb", type=int, help="only the streaming run, on a corpus of this many MB")
    p.add_argument("--streaming-tokenizer", default="wordpiece")
    args = p.parse_args()
    if args.streaming_mb:
        streaming_memory(args.data_dir / "wiki.train.tokens", args.streaming_mb, args.streaming_tokenizer, 128)
        return
    with tempfile.TemporaryDirectory(prefix="bertds-bench-") as tmp:
        big = repeated_corpus(args.data_dir / "wiki.train.tokens", args.min_tokens, Path(tmp))
        print(f"d2l recipe, max_len {args.max_len}, word vocabulary; time = files -> example tensors", flush=True)
        compare(
            "WikiText-2 valid", args.data_dir / "wiki.valid.tokens", args.max_len, args.reference_runs, args.bertds_runs
        )
        compare(
            "WikiText-2 train", args.data_dir / "wiki.train.tokens", args.max_len, args.reference_runs, args.bertds_runs
        )
        ratio = compare(f"train repeated ({big.name})", big, args.max_len, args.reference_runs, args.bertds_runs)
        print(
            f"ratio on the >= {args.min_tokens / 1e6:.0f}M-token corpus: {ratio:.1f}x "
            f"({'meets' if ratio >= 20 else 'misses'} the 20x target)",
            flush=True,
        )
        if not args.skip_loader:
            loader_throughput(
                args.data_dir / "wiki.train.tokens",
                Path(tmp) / "cache",
                args.vocab_size,
                args.micro_batch,
                args.batches,
                args.num_workers,
            )


if __name__ == "__main__":
    sys.exit(run_cli(main))
