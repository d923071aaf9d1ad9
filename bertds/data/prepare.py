"""Prepare once, train many: corpus -> tokenizer -> examples, written as a prepared directory (``shards.py``), and
every decision about preparing or reusing one: ``launcher/prepare_data.py``'s ``--out``, training's ``--prepared``,
and the cache keyed by corpus and recipe, prepared by one process or, streaming, by every rank.

A directory is written to ``NAME.tmp-HOST-PID`` and renamed when complete, so an interrupted preparation is never
taken for a valid one; those of dead processes of this host are removed (a cache shared by several hosts keeps the
others'). A damaged cache entry is prepared again, a damaged ``--prepared`` or ``--out`` directory refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from bertds.data.bert_examples import DocumentPool, TokenizedChunk, bert_examples, chunk_sentences
from bertds.data.config import MAX_MAX_LEN, MIN_MAX_LEN, DataConfig
from bertds.data.corpus import Corpus, resolve_corpus
from bertds.data.d2l import corpus_paragraphs, d2l_examples
from bertds.data.examples import ExampleConfig
from bertds.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SHARDS,
    DamagedData,
    PreparedData,
    in_memory_dataset,
    load_prepared,
    seal,
    write_shards,
)
from bertds.data.tokenizer import D2L_SPECIAL_TOKENS, DEFAULT_WORDPIECE_VOCAB, Vocab, build_vocab, tokenizer_recipe
from bertds.errors import UserError

if TYPE_CHECKING:
    import datasets

CACHE_DIR_ENV = "BERTDS_CACHE_DIR"
DOCUMENTS_PER_CHUNK = 256  # documents whose examples are made together
# Streaming: random next segments of chunk k come from chunks k - REACH .. k + REACH (33 chunks, 8,448 documents,
# held as token ids); read whole, from all documents.
STREAMING_RANDOM_DOCUMENT_REACH = 16
TMP_MARK = ".tmp-"
T = TypeVar("T")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "bertds"))


@dataclass(frozen=True)
class TokenizerChoice:
    spec: str = "word"  # "word", "wordpiece", or a vocab.txt / tokenizer.json path
    vocab_size: int = DEFAULT_WORDPIECE_VOCAB  # wordpiece
    min_freq: int = 5  # word

    def recipe(self) -> dict:
        return tokenizer_recipe(self.spec, self.vocab_size, self.min_freq)


def corpus_texts(corpus: Corpus, vocab_unk: str | None = None) -> Iterator[str]:
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
        try:
            return Vocab.load(cached)
        except Exception as e:
            print(
                f"warning: cached tokenizer {cached} cannot be read ({str(e).splitlines()[0][:120]}); training "
                "it again",
                file=sys.stderr,
            )
            shutil.rmtree(cached, ignore_errors=True)
    unk = "[UNK]" if choice.spec == "wordpiece" else None
    vocab = build_vocab(choice.spec, corpus_texts(corpus, unk), choice.vocab_size, choice.min_freq)
    if cached is not None:
        remove_stale_tmp(cached.parent)
        tmp = preparation_dir(cached, tmp_owner())
        tmp.mkdir(parents=True, exist_ok=True)
        vocab.save(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process saved the same tokenizer first
            shutil.rmtree(tmp, ignore_errors=True)
    return vocab


def check_recipe(config: ExampleConfig, streaming: bool) -> None:
    if config.recipe not in ("d2l", "bert"):
        raise UserError(f"--recipe {config.recipe}: use d2l or bert")
    if config.sentence_task not in ("nsp", "sop"):
        raise UserError(f"--sentence-task {config.sentence_task}: use nsp or sop")
    if config.recipe == "d2l" and (config.sentence_task != "nsp" or streaming):
        raise UserError(
            "--sentence-task sop and --streaming need --recipe bert (d2l pairs a "
            "sentence with a random sentence of the whole corpus, which needs it all in memory)"
        )
    if config.dynamic_masking and config.dupe_factor != 1:
        raise UserError(
            "--dupe-factor draws new pairs and new static masks for each copy of the corpus: use it with "
            "--masking static, or leave it at 1 with --masking dynamic (masks redrawn every epoch)"
        )
    if not 0 < config.mask_prob < 1:
        raise UserError(f"--mask-prob {config.mask_prob}: the share of tokens predicted must be between 0 and 1")
    if not MIN_MAX_LEN <= config.max_len <= MAX_MAX_LEN or config.max_predictions < 1:
        raise UserError(
            f"--max-len {config.max_len} / --max-predictions {config.max_predictions}: max_len must "
            f"be in {MIN_MAX_LEN}..{MAX_MAX_LEN} (<cls> A <sep> B <sep> with a token in each segment) "
            "and max_predictions at least 1"
        )


def d2l_columns(
    corpus: Corpus, vocab: Vocab | None, choice: TokenizerChoice, config: ExampleConfig, cache_dir: Path | None
) -> tuple[dict[str, np.ndarray], Vocab]:
    """d2l's recipe on the whole corpus in memory."""
    paragraphs = corpus_paragraphs(corpus)
    if vocab is None:
        vocab = (
            Vocab.from_word_counts(paragraphs.word_counts(), choice.min_freq)
            if choice.spec == "word"
            else obtain_vocab(corpus, choice, cache_dir)
        )
    return d2l_examples(paragraphs, vocab, config), vocab


def document_windows(
    chunks: Iterable[TokenizedChunk], reach: int | None
) -> Iterator[tuple[list[TokenizedChunk], int, int]]:
    """(window, position of chunk k in it, k) for every chunk k: the window holds the chunks k - reach .. k + reach
    (all chunks when reach is None), so at most 2 * reach + 1 are in memory."""
    stream, window = iter(chunks), deque[TokenizedChunk]()
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


def bert_chunks(
    corpus: Corpus, vocab: Vocab, config: ExampleConfig, streaming: bool, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Example columns chunk by chunk (DOCUMENTS_PER_CHUNK documents each); with world_size > 1 this rank's
    disjoint part of the documents (``split_dataset_by_node``). Random next segments come from all documents
    (read whole) or from the chunks within STREAMING_RANDOM_DOCUMENT_REACH (streaming)."""
    documents = corpus.documents(streaming=streaming)
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        documents = split_dataset_by_node(documents, rank=rank, world_size=world_size)
    texts = (row["text"] for row in documents)
    chunks = (
        chunk_sentences(chunk, vocab, corpus.wikitext, corpus.tokenized)
        for chunk in iter(lambda: list(islice(texts, DOCUMENTS_PER_CHUNK)), [])
    )
    reach = STREAMING_RANDOM_DOCUMENT_REACH if streaming else None
    for window, position, index in document_windows(chunks, reach):
        yield bert_examples(DocumentPool(window), position, vocab, config, chunk_index=index)


def write_examples(
    directory: Path,
    corpus: Corpus,
    vocab: Vocab | None,
    choice: TokenizerChoice,
    config: ExampleConfig,
    streaming: bool,
    cache_dir: Path | None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[int, Vocab]:
    """This rank's examples as shards under ``directory/shards``; returns (examples written, vocab)."""
    check_recipe(config, streaming)
    shards = directory / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    if config.recipe == "d2l":
        columns, vocab = d2l_columns(corpus, vocab, choice, config, cache_dir)
        return write_shards(shards, "examples-r00-c00000", columns, config), vocab
    vocab = vocab or obtain_vocab(corpus, choice, cache_dir)
    total = 0
    for index, columns in enumerate(bert_chunks(corpus, vocab, config, streaming, rank, world_size)):
        total += write_shards(shards, f"examples-r{rank:02d}-c{index:05d}", columns, config)
    return total, vocab


def recipe_of(corpus: Corpus, choice: TokenizerChoice, config: ExampleConfig) -> dict:
    return {
        "version": FORMAT_VERSION,
        "corpus": corpus.fingerprint(),
        "wikitext": corpus.wikitext,
        "tokenized": corpus.tokenized,
        "split": corpus.split,
        "tokenizer": choice.recipe(),
        **asdict(config),
    }


def finish(
    tmp: Path, path: Path, corpus: Corpus, vocab: Vocab, config: ExampleConfig, recipe: dict, streaming: bool
) -> None:
    """Seals the shards in tmp (tokenizer, manifest) and renames tmp -> path (the directory becomes valid)."""
    fields = {
        **recipe,
        "source": corpus.describe(),
        "streaming": streaming,
        "masking": "dynamic" if config.dynamic_masking else "static",
    }
    if seal(tmp, vocab, fields) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"{corpus.describe()} gave no pretraining example (no document with text, or no pair "
            f"fits in max_len {config.max_len}); use a larger corpus, raise --max-len or pass "
            "--truncate"
        )
    if path.exists() and not (path / MANIFEST).is_file():
        shutil.rmtree(path)  # an incomplete directory (no manifest): never valid, safe to replace
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same preparation first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def tmp_owner() -> str:
    """This process, as named in its preparation directories: ``HOST-PID``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def preparation_dir(path: Path, owner: str) -> Path:
    """Where ``owner`` (``HOST-PID``) prepares ``path`` before renaming it there."""
    return path.with_name(f"{path.name}{TMP_MARK}{owner}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_tmp(directory: Path, name: str = "") -> None:
    """Removes ``NAME.tmp-HOST-PID`` directories (any NAME when ``name`` is empty) of this host whose process has
    died (another host's processes cannot be checked from here: theirs stay), and older versions' ``NAME.tmp-PID``."""
    if not directory.is_dir():
        return
    for tmp in directory.glob(f"{name or '*'}{TMP_MARK}*"):
        host, _, pid = tmp.name.rpartition(TMP_MARK)[2].rpartition("-")
        if tmp.is_dir() and host in ("", socket.gethostname()) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def reusable(path: Path, rebuild_damaged: bool) -> PreparedData | None:
    """The complete directory at ``path``, or None when there is none (a damaged one is removed when
    ``rebuild_damaged``, else refused)."""
    if not (path / MANIFEST).is_file():
        return None
    try:
        return load_prepared(path, from_cache=True)
    except DamagedData as e:
        if not rebuild_damaged:
            raise
        print(f"warning: cache entry {path} is damaged ({e.problem}); preparing it again", file=sys.stderr)
        shutil.rmtree(path)
        return None


def check_target(path: Path) -> None:
    """``path`` (with no prepared data in it) may be written: it is absent or an empty directory; anything else
    there is the user's and stays."""
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.exists() or path.is_symlink():
        kind = "a directory that is not prepared data" if path.is_dir() else "a file"
        raise UserError(
            f"{path} is {kind}; nothing was written there: choose a new directory to write the prepared data to"
        )


def prepare_directory(
    corpus: Corpus,
    choice: TokenizerChoice,
    config: ExampleConfig,
    path: Path,
    streaming: bool = False,
    cache_dir: Path | None = None,
    rebuild_damaged: bool = False,
) -> PreparedData:
    """One process prepares ``corpus`` into ``path`` (reused if a complete one is already there)."""
    remove_stale_tmp(path.parent, "" if rebuild_damaged else path.name)
    found = reusable(path, rebuild_damaged)
    if found is not None:
        return found
    if not rebuild_damaged:
        check_target(path)
    tmp = preparation_dir(path, tmp_owner())
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
    # A corpus without files is a hub corpus.
    source = corpus.files[0].parent.name if corpus.files else corpus.hub[0].split("/")[-1]  # type: ignore[index]
    name = source or "corpus"
    return cache_dir / f"{name}-{corpus.split}-{config.recipe}-len{config.max_len}-{key}"


# --- entry points ------------------------------------------------------------------------------------------------


def build_examples(
    corpus: Corpus,
    config: ExampleConfig,
    min_freq: int = 5,
    tokenizer: str = "word",
    vocab_size: int = DEFAULT_WORDPIECE_VOCAB,
    streaming: bool = False,
) -> tuple[datasets.Dataset, Vocab]:
    """Corpus -> vocabulary -> token ids -> examples, all in memory (no cache)."""
    choice = TokenizerChoice(tokenizer, vocab_size, min_freq)
    check_recipe(config, streaming)
    if config.recipe == "d2l":
        columns, vocab = d2l_columns(corpus, None, choice, config, None)
        parts = [columns]
    else:
        vocab = obtain_vocab(corpus, choice, None)
        parts = list(bert_chunks(corpus, vocab, config, streaming))
    if sum(len(part["tokens"]) for part in parts) == 0:
        raise UserError(
            f"no sentence pair of {corpus.describe()} fits in max_len {config.max_len}; "
            "raise --max-len or pass --truncate"
        )
    columns = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return in_memory_dataset(columns, config), vocab


def prepare_pretraining_data(
    corpus: Corpus,
    config: ExampleConfig,
    cache_dir: str | Path | None = None,
    min_freq: int = 5,
    tokenizer: str = "word",
    vocab_size: int = DEFAULT_WORDPIECE_VOCAB,
    streaming: bool = False,
) -> PreparedData:
    """The examples from the cache when present (and intact), else prepared into it (one process)."""
    choice = TokenizerChoice(tokenizer, vocab_size, min_freq)
    cache = Path(cache_dir or default_cache_dir())
    return prepare_directory(
        corpus, choice, config, cache_path(corpus, choice, config, cache), streaming, cache, rebuild_damaged=True
    )


def example_config(config: DataConfig) -> ExampleConfig:
    # --sentence-task none trains without the sentence loss on the same examples as nsp.
    sentence_task = "nsp" if config.sentence_task == "none" else config.sentence_task
    return ExampleConfig(
        max_len=config.max_len,
        seed=config.seed,
        truncate=config.truncate,
        recipe=config.recipe,
        sentence_task=sentence_task,
        short_seq_prob=config.short_seq_prob,
        max_predictions_per_seq=config.max_predictions,
        whole_word_masking=config.whole_word_masking,
        dynamic_masking=config.masking == "dynamic",
        dupe_factor=config.dupe_factor,
        mask_prob=config.mask_prob,
    )


# Flags that shape the examples, with the manifest key (ExampleConfig's field) each is recorded under.
EXAMPLE_FLAGS = {
    "recipe": "recipe",
    "sentence_task": "sentence_task",
    "mask_prob": "mask_prob",
    "masking": "dynamic_masking",
    "whole_word_masking": "whole_word_masking",
    "max_predictions": "max_predictions_per_seq",
    "short_seq_prob": "short_seq_prob",
    "dupe_factor": "dupe_factor",
    "truncate": "truncate",
}


def check_prepared_matches(data: PreparedData, config: DataConfig) -> None:
    """A prepared directory fixes the tokenizer, max_len and the recipe; flags asking for others are refused (a flag
    left at its default takes the directory's)."""
    manifest = data.manifest or {}
    asked = asdict(example_config(config))
    defaults = {f.name: f.default for f in fields(DataConfig)}
    for flag, key in EXAMPLE_FLAGS.items():
        if getattr(config, flag) != defaults[flag] and key in manifest and manifest[key] != asked[key]:
            raise UserError(
                f"--prepared {data.path} was prepared with {key} {manifest[key]}, not --{flag.replace('_', '-')} "
                f"{getattr(config, flag)}; drop the flag or prepare the data with it"
            )
    if manifest.get("max_len") != config.max_len:
        raise UserError(
            f"--prepared {data.path} holds max_len {manifest.get('max_len')} examples, not --max-len "
            f"{config.max_len}; pass --max-len {manifest.get('max_len')} or prepare the data again"
        )
    if config.tokenizer not in ("word", "wordpiece"):
        wanted = Vocab.from_file(config.tokenizer)
        if wanted.fingerprint() != data.vocab.fingerprint():
            raise UserError(
                f"--prepared {data.path} was tokenized with another tokenizer than --tokenizer "
                f"{config.tokenizer}; drop --tokenizer or prepare the data with it"
            )
    elif config.tokenizer != "word" and manifest.get("tokenizer", {}).get("kind") != config.tokenizer:
        raise UserError(
            f"--prepared {data.path} was tokenized with {manifest.get('tokenizer')}, not --tokenizer "
            f"{config.tokenizer}; drop --tokenizer or prepare the data with it"
        )


def on_rank0(work: Callable[[], T], rank: int) -> T:
    """``work()`` on rank 0, its result on every rank; a UserError there is raised on every rank (the others
    would otherwise wait for rank 0 forever)."""
    import torch.distributed as dist

    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except UserError as e:
            error = e
    if dist.is_initialized():
        box = [(result, None if error is None else str(error))]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
        if message is not None and error is None:
            raise UserError(message)
    if error is not None:
        raise error
    return result  # type: ignore[return-value]  # rank 0's result: set, or an error was raised


def prepare_ranks(
    corpus: Corpus, choice: TokenizerChoice, config: ExampleConfig, path: Path, cache: Path, rank: int, world_size: int
) -> bool:
    """Every rank prepares its disjoint part (world_size-th of the documents) of a streamed corpus into one
    directory; True when it was prepared now, False when a complete one was there."""
    import torch.distributed as dist

    if on_rank0(lambda: reusable(path, rebuild_damaged=True) is not None, rank):
        return False

    def cache_vocab() -> None:
        obtain_vocab(corpus, choice, cache)

    on_rank0(cache_vocab, rank)  # rank 0 trains the tokenizer into the cache, the others then read it
    vocab = obtain_vocab(corpus, choice, cache)
    tmp = preparation_dir(path, on_rank0(tmp_owner, rank))
    write_examples(tmp, corpus, vocab, choice, config, True, cache, rank, world_size)
    dist.barrier()

    def seal_all() -> bool:
        try:
            finish(tmp, path, corpus, vocab, config, recipe_of(corpus, choice, config), True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    return on_rank0(seal_all, rank)


def prepare_for_training(config: DataConfig, rank: int) -> PreparedData:
    """``--prepared`` checked against the flags; else rank 0 builds the cache entry (if missing or damaged) while
    the other ranks wait, and every rank memory-maps it. With ``--streaming`` every rank prepares its own disjoint
    part of the corpus into one shared directory. ``from_cache`` says whether the entry was there before."""
    import torch.distributed as dist

    if config.prepared:
        data = load_prepared(config.prepared)
        check_prepared_matches(data, config)
        return data
    corpus = resolve_corpus(config.corpus, config.data_dir, config.split)
    choice = TokenizerChoice(config.tokenizer, config.vocab_size, config.min_freq)
    examples = example_config(config)
    cache = Path(config.cache_dir or default_cache_dir())
    path = cache_path(corpus, choice, examples, cache)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if config.streaming and world_size > 1:
        built = prepare_ranks(corpus, choice, examples, path, cache, rank, world_size)
        return load_prepared(path, from_cache=not built)
    prepared: list[PreparedData] = []

    def build() -> bool:
        prepared.append(
            prepare_directory(corpus, choice, examples, path, config.streaming, cache, rebuild_damaged=True)
        )
        return not prepared[0].from_cache

    built = on_rank0(build, rank)
    return prepared[0] if prepared else load_prepared(path, from_cache=not built)
