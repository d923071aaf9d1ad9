"""Prepare once, train many: corpus -> tokenizer -> examples, written as Arrow shards plus a manifest.

A prepared directory holds ``manifest.json`` (corpus, tokenizer hash, max_len, seed, recipe, example counts),
``tokenizer.json`` and ``shards/*.arrow``; training memory-maps the shards. It is written to a temporary directory
and renamed when complete, so an interrupted preparation is never taken for a valid one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import generate_random_fingerprint

from bertds.data.bert_examples import DocumentPool, TokenizedChunk, bert_examples, chunk_sentences
from bertds.data.corpus import Corpus, CorpusSource, resolve_corpus
from bertds.data.examples import ExampleConfig, d2l_examples, d2l_paragraphs
from bertds.data.masking import MaskingSpec
from bertds.data.tokenizer import (D2L_SPECIAL_TOKENS, DEFAULT_WORDPIECE_VOCAB, Vocab, build_vocab,
                                   describe_vocab, tokenizer_recipe)
from bertds.errors import UserError

FORMAT_VERSION = 4  # bump when the example semantics or the layout change, so stale caches are not reused
MANIFEST = "manifest.json"
SHARDS = "shards"
DOCUMENTS_PER_CHUNK = 256  # documents whose examples are made together
# Streaming: random next segments of chunk k come from chunks k - REACH .. k + REACH (33 chunks, 8,448 documents,
# held as token ids); read whole, from all documents.
STREAMING_RANDOM_DOCUMENT_REACH = 16
ROWS_PER_SHARD = 1 << 17
DYNAMIC_MASKING_ATTR = "bertds_dynamic_masking"  # attribute of PreparedData.examples read by PretrainingBatches


@dataclass(frozen=True)
class TokenizerChoice:
    spec: str = "word"  # "word", "wordpiece", or a vocab.txt / tokenizer.json path
    vocab_size: int = DEFAULT_WORDPIECE_VOCAB  # wordpiece
    min_freq: int = 5  # word

    def recipe(self) -> dict:
        return tokenizer_recipe(self.spec, self.vocab_size, self.min_freq)


@dataclass
class PreparedData:
    examples: datasets.Dataset
    vocab: Vocab
    path: Path
    from_cache: bool
    masking: MaskingSpec | None = None  # set when the collator draws the masks (dynamic masking)
    manifest: dict | None = None


def example_features(config: ExampleConfig) -> datasets.Features:
    seq = datasets.Sequence(datasets.Value("int32"), length=config.max_len)
    features = {"tokens": seq, "segments": datasets.Sequence(datasets.Value("int8"), length=config.max_len),
                "valid_len": datasets.Value("int32"), "nsp_label": datasets.Value("int8")}
    if not config.dynamic_masking:
        preds = datasets.Sequence(datasets.Value("int32"), length=config.max_predictions)
        features.update(pred_positions=preds, mlm_labels=preds,
                        mlm_weights=datasets.Sequence(datasets.Value("float32"), length=config.max_predictions))
    return datasets.Features(features)


def to_table(columns: dict[str, np.ndarray], features: datasets.Features) -> pa.Table:
    arrays = []
    for name in features:
        values = columns[name]
        if values.ndim == 2:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1]))
        else:
            arrays.append(pa.array(values))
    return pa.Table.from_arrays(arrays, schema=features.arrow_schema)


def in_memory_dataset(columns: dict[str, np.ndarray], config: ExampleConfig) -> datasets.Dataset:
    # A random fingerprint, as datasets gives in-memory results: its default hashes every byte of the table.
    return datasets.Dataset(datasets.table.InMemoryTable(to_table(columns, example_features(config))),
                            fingerprint=generate_random_fingerprint())


def _write_shards(directory: Path, prefix: str, columns: dict[str, np.ndarray], config: ExampleConfig) -> int:
    """Writes the rows as Arrow stream files of at most ROWS_PER_SHARD rows; returns the row count."""
    features = example_features(config)
    total = len(columns["tokens"])
    for part, begin in enumerate(range(0, total, ROWS_PER_SHARD)):
        table = to_table({k: v[begin:begin + ROWS_PER_SHARD] for k, v in columns.items()}, features)
        with pa.OSFile(str(directory / f"{prefix}-{part:03d}.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return total


def _as_corpus(source: Corpus | CorpusSource, split: str) -> Corpus:
    if isinstance(source, Corpus):
        return source
    return resolve_corpus(None, str(source.data_dir) if source.data_dir else None, split)


def _corpus_texts(corpus: Corpus, vocab_unk: str | None = None) -> Iterator[str]:
    """Documents' text for tokenizer training; WikiText's "<unk>" becomes the tokenizer's own unknown token."""
    for row in corpus.documents(streaming=True):
        text = row["text"]
        yield text.replace(D2L_SPECIAL_TOKENS["unk"], vocab_unk) if corpus.wikitext and vocab_unk else text


def obtain_vocab(corpus: Corpus, choice: TokenizerChoice, cache_dir: Path | None) -> Vocab:
    """The tokenizer for ``corpus``; trained ones are cached (keyed by corpus and settings), so that the phases
    of a two-phase run (128 then 512 tokens) share one vocabulary."""
    if choice.spec not in ("word", "wordpiece"):
        return build_vocab(choice.spec, iter(()), choice.vocab_size, choice.min_freq)
    key = hashlib.sha256(json.dumps([corpus.fingerprint(), corpus.wikitext, choice.recipe()]).encode()).hexdigest()[:16]
    cached = cache_dir / "tokenizers" / f"{choice.spec}-{key}" if cache_dir else None
    if cached is not None and (cached / "tokenizer.json").is_file():
        return Vocab.load(cached)
    unk = "[UNK]" if choice.spec == "wordpiece" else None
    vocab = build_vocab(choice.spec, _corpus_texts(corpus, unk), choice.vocab_size, choice.min_freq)
    if cached is not None:
        tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        vocab.save(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process saved the same tokenizer first
            shutil.rmtree(tmp, ignore_errors=True)
    return vocab


def _check_recipe(config: ExampleConfig, streaming: bool) -> None:
    if config.recipe not in ("d2l", "bert"):
        raise UserError(f"--recipe {config.recipe}: use d2l or bert")
    if config.sentence_task not in ("nsp", "sop"):
        raise UserError(f"--sentence-task {config.sentence_task}: use nsp or sop")
    if config.recipe == "d2l" and (config.sentence_task != "nsp" or streaming or config.dupe_factor != 1):
        raise UserError("--sentence-task sop, --streaming and --dupe-factor need --recipe bert (d2l pairs a "
                        "sentence with a random sentence of the whole corpus, which needs it all in memory)")
    if config.dynamic_masking and config.dupe_factor != 1:
        raise UserError("--dupe-factor copies the corpus with different static masks; with --masking dynamic "
                        "the masks change every epoch anyway, leave --dupe-factor at 1")
    if not 0 < config.mask_prob < 1:
        raise UserError(f"--mask-prob {config.mask_prob}: the share of tokens predicted must be between 0 and 1")
    if not 3 < config.max_len <= 512 or config.max_predictions < 1:
        raise UserError(f"--max-len {config.max_len} / --max-predictions {config.max_predictions}: max_len must "
                        "be in 4..512 and max_predictions at least 1")


def d2l_columns(corpus: Corpus, vocab: Vocab | None, choice: TokenizerChoice, config: ExampleConfig,
                cache_dir: Path | None) -> tuple[dict[str, np.ndarray], Vocab]:
    """d2l's recipe on the whole corpus in memory."""
    paragraphs = d2l_paragraphs(corpus.lines())
    if not (paragraphs.paragraph_size >= 2).any():
        raise UserError(f"{corpus.describe()} has no paragraph with two or more sentences (sentences are "
                        "separated by ' . '); check that it is WikiText-style text")
    if vocab is None:
        vocab = Vocab.from_word_counts(paragraphs.word_counts(), choice.min_freq) if choice.spec == "word" \
            else obtain_vocab(corpus, choice, cache_dir)
    return d2l_examples(paragraphs, vocab, config), vocab


def document_windows(chunks: Iterable[TokenizedChunk], reach: int | None
                     ) -> Iterator[tuple[list[TokenizedChunk], int, int]]:
    """(window, position of chunk k in it, k) for every chunk k: the window holds the chunks k - reach .. k + reach
    (all chunks when reach is None), so at most 2 * reach + 1 are in memory."""
    stream, window = iter(chunks), deque()
    first = done = 0  # corpus index of window[0]; chunks before `done` have been yielded
    exhausted = False
    while True:
        while not exhausted and (reach is None or first + len(window) <= done + reach):
            chunk = next(stream, None)
            exhausted = chunk is None
            if chunk is not None:
                window.append(chunk)
        if done == first + len(window):
            return
        yield list(window), done - first, done
        done += 1
        while reach is not None and first < done - reach:
            window.popleft()
            first += 1


def bert_chunks(corpus: Corpus, vocab: Vocab, config: ExampleConfig, streaming: bool, rank: int = 0,
                world_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Example columns chunk by chunk (DOCUMENTS_PER_CHUNK documents each); with world_size > 1 this rank's
    disjoint part of the documents (``split_dataset_by_node``). Random next segments come from all documents
    (read whole) or from the chunks within STREAMING_RANDOM_DOCUMENT_REACH (streaming)."""
    documents = corpus.documents(streaming=streaming)
    if world_size > 1:
        documents = split_dataset_by_node(documents, rank=rank, world_size=world_size)
    texts = (row["text"] for row in documents)
    chunks = (chunk_sentences(chunk, vocab, corpus.wikitext, corpus.tokenized)
              for chunk in iter(lambda: list(islice(texts, DOCUMENTS_PER_CHUNK)), []))
    reach = STREAMING_RANDOM_DOCUMENT_REACH if streaming else None
    for window, position, index in document_windows(chunks, reach):
        yield bert_examples(DocumentPool(window), position, vocab, config, chunk_index=index)


def write_examples(directory: Path, corpus: Corpus, vocab: Vocab | None, choice: TokenizerChoice,
                   config: ExampleConfig, streaming: bool, cache_dir: Path | None, rank: int = 0,
                   world_size: int = 1) -> tuple[int, Vocab]:
    """This rank's examples as shards under ``directory/shards``; returns (examples written, vocab)."""
    _check_recipe(config, streaming)
    shards = directory / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    if config.recipe == "d2l":
        columns, vocab = d2l_columns(corpus, vocab, choice, config, cache_dir)
        return _write_shards(shards, "examples-r00-c00000", columns, config), vocab
    vocab = vocab or obtain_vocab(corpus, choice, cache_dir)
    total = 0
    for index, columns in enumerate(bert_chunks(corpus, vocab, config, streaming, rank, world_size)):
        total += _write_shards(shards, f"examples-r{rank:02d}-c{index:05d}", columns, config)
    return total, vocab


def recipe_of(corpus: Corpus, choice: TokenizerChoice, config: ExampleConfig) -> dict:
    return {"version": FORMAT_VERSION, "corpus": corpus.fingerprint(), "wikitext": corpus.wikitext,
            "tokenized": corpus.tokenized, "split": corpus.split,
            "tokenizer": choice.recipe(), **asdict(config)}


def finish(tmp: Path, path: Path, corpus: Corpus, vocab: Vocab, config: ExampleConfig, recipe: dict,
           streaming: bool) -> None:
    """Counts the shards, writes tokenizer and manifest, renames tmp -> path (the directory becomes valid)."""
    files = sorted((tmp / SHARDS).glob("*.arrow"))
    counts = {f.name: pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows for f in files}
    total = sum(counts.values())
    if total == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{corpus.describe()} gave no pretraining example (no document with text, or no pair "
                        f"fits in max_len {config.max_len}); use a larger corpus, raise --max-len or pass "
                        "--truncate")
    vocab.save(tmp)
    manifest = {**recipe, "source": corpus.describe(), "streaming": streaming, "num_examples": total,
                "shards": counts, "tokenizer_info": describe_vocab(vocab), "vocab_size": len(vocab),
                "masking": "dynamic" if config.dynamic_masking else "static"}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if path.exists() and not (path / MANIFEST).is_file():
        shutil.rmtree(path)  # an incomplete directory (no manifest): never valid, safe to replace
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same preparation first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(path: str | Path, from_cache: bool = True) -> PreparedData:
    """Memory-maps a prepared directory's shards."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a prepared data directory (no {MANIFEST}); write one with "
                        "launcher/prepare_data.py")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path} was prepared by another bertds version (format {manifest.get('version')}, "
                        f"now {FORMAT_VERSION}); prepare it again")
    vocab = Vocab.load(path)
    if vocab.fingerprint() != manifest["tokenizer_info"]["fingerprint"]:
        raise UserError(f"{path}/tokenizer.json is not the tokenizer its examples were made with; prepare the "
                        "data again")
    shards = [datasets.Dataset.from_file(str(path / SHARDS / name)) for name in manifest["shards"]]
    examples = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    config_fields = {k: manifest[k] for k in ExampleConfig.__dataclass_fields__ if k in manifest}
    masking = ExampleConfig(**config_fields).masking(vocab) if manifest["masking"] == "dynamic" else None
    # The engine hands PretrainingBatches only the examples, so the masking spec travels with them.
    setattr(examples, DYNAMIC_MASKING_ATTR, masking)
    return PreparedData(examples, vocab, path, from_cache, masking, manifest)


def prepare_directory(corpus: Corpus, choice: TokenizerChoice, config: ExampleConfig, path: Path,
                      streaming: bool = False, cache_dir: Path | None = None) -> PreparedData:
    """One process prepares ``corpus`` into ``path`` (reused if a complete one is already there)."""
    if (path / MANIFEST).is_file():
        return load_prepared(path, from_cache=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _, vocab = write_examples(tmp, corpus, None, choice, config, streaming, cache_dir)
        finish(tmp, path, corpus, vocab, config, recipe_of(corpus, choice, config), streaming)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(path, from_cache=False)


def cache_path(corpus: Corpus, choice: TokenizerChoice, config: ExampleConfig, cache_dir: Path) -> Path:
    recipe = recipe_of(corpus, choice, config)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    name = (corpus.files[0].parent.name if corpus.files else corpus.hub[0].split("/")[-1]) or "corpus"
    return cache_dir / f"{name}-{corpus.split}-{config.recipe}-len{config.max_len}-{key}"
