"""Vocabularies as Hugging Face ``tokenizers`` objects.

Three kinds (``--tokenizer``):

- ``word`` (default): d2l's word-level vocabulary, whitespace-split words seen at least ``min_freq`` times plus the
  reserved tokens ``<unk> <pad> <mask> <cls> <sep>`` at ids 0-4;
- ``wordpiece``: WordPiece trained on the corpus with ``tokenizers`` (lower-cased, BERT's special tokens at the ids
  of Google's BERT vocabularies: ``[PAD]`` 0, ``[unused0-98]`` 1-99, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102,
  ``[MASK]`` 103);
- a path: an existing BERT ``vocab.txt`` (cased when it holds capitalised words) or a ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

from bertds.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
D2L_SPECIAL_TOKENS = {"unk": "<unk>", "pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "sep": "<sep>"}
BERT_SPECIAL_TOKENS = {"unk": "[UNK]", "pad": "[PAD]", "mask": "[MASK]", "cls": "[CLS]", "sep": "[SEP]"}
# Google's vocab.txt layout, so that pad 0 / cls 101 / sep 102 / mask 103 hold for trained vocabularies too.
BERT_RESERVED = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_KINDS = ("word", "wordpiece")
DEFAULT_WORDPIECE_VOCAB = 30522
# encode_indexed tokenizes each distinct word alone: exact only when the pre-tokenizer splits on whitespace.
WHITESPACE_PRE_TOKENIZERS = ("BertPreTokenizer", "WhitespaceSplit", "Whitespace")


def _special_tokens_of(tokenizer: Tokenizer) -> dict[str, str]:
    for candidate in (D2L_SPECIAL_TOKENS, BERT_SPECIAL_TOKENS):
        if all(tokenizer.token_to_id(t) is not None for t in candidate.values()):
            return candidate
    return D2L_SPECIAL_TOKENS  # Vocab() then names the missing tokens


class Vocab:
    """A ``tokenizers.Tokenizer`` plus the ids of the special tokens BERT needs."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str] | None = None):
        special_tokens = special_tokens or _special_tokens_of(tokenizer)
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        ids = {role: tokenizer.token_to_id(token) for role, token in special_tokens.items()}
        missing = [special_tokens[role] for role, i in ids.items() if i is None]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}; build it with bertds")
        found = cast(dict[str, int], ids)  # every role has an id (checked above)
        self.unk_id, self.pad_id, self.mask_id, self.cls_id, self.sep_id = (
            found["unk"],
            found["pad"],
            found["mask"],
            found["cls"],
            found["sep"],
        )
        self.special_ids = sorted(found.values())

    @classmethod
    def train_word_level(cls, sentences: Iterable[str], min_freq: int = 5) -> Vocab:
        # Counted here rather than with tokenizers' WordLevelTrainer: that trainer gives a corpus word equal to
        # a special token (WikiText is full of "<unk>") a second id and leaves a hole at the special's id.
        return cls.from_word_counts(
            Counter(word for sentence in sentences for word in sentence.lower().split()), min_freq
        )

    @classmethod
    def from_word_counts(cls, counts: dict[str, int], min_freq: int = 5) -> Vocab:
        """d2l's vocabulary from lower-cased word counts: the reserved tokens, then words by falling count."""
        reserved = list(D2L_SPECIAL_TOKENS.values())
        words = sorted(w for w, n in counts.items() if n >= min_freq and w not in reserved)
        words.sort(key=counts.__getitem__, reverse=True)  # by falling count, ties alphabetical (stable sort)
        token_to_id = {token: i for i, token in enumerate(reserved + words)}
        tokenizer = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token=D2L_SPECIAL_TOKENS["unk"]))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return cls(tokenizer, D2L_SPECIAL_TOKENS)

    @classmethod
    def train_wordpiece(
        cls, texts: Iterable[str], vocab_size: int = DEFAULT_WORDPIECE_VOCAB, lowercase: bool = True
    ) -> Vocab:
        """WordPiece trained on ``texts`` with BERT's normaliser and pre-tokenizer; exactly ``vocab_size`` tokens
        unless the corpus is too small to make that many (then a UserError says so)."""
        if vocab_size <= len(BERT_RESERVED):
            raise UserError(
                f"--vocab-size {vocab_size} leaves no room beside BERT's {len(BERT_RESERVED)} "
                "reserved tokens; use e.g. 30522"
            )
        wordpiece = BertWordPieceTokenizer(lowercase=lowercase)
        wordpiece.train_from_iterator(
            iter(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=[*BERT_RESERVED], show_progress=False
        )
        vocab = cls(wordpiece._tokenizer, BERT_SPECIAL_TOKENS)
        if len(vocab) != vocab_size:
            raise UserError(
                f"the corpus only supports a WordPiece vocabulary of {len(vocab)} tokens, not "
                f"--vocab-size {vocab_size}; lower --vocab-size or use a larger corpus"
            )
        return vocab

    @classmethod
    def from_file(cls, path: str | Path) -> Vocab:
        """A BERT ``vocab.txt`` (one token per line, id = line number) or a ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"tokenizer file {path} does not exist; pass --tokenizer word, wordpiece, a BERT "
                "vocab.txt or a tokenizer.json"
            )
        if path.suffix == ".json":
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise UserError(
                    f"{path} is not a tokenizers tokenizer.json ({str(e)[:120]}); pass a file written "
                    "by bertds or Hugging Face, or a BERT vocab.txt"
                ) from None
            pre_tokenizer = (json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}).get("type")
            if pre_tokenizer not in WHITESPACE_PRE_TOKENIZERS:
                raise UserError(
                    f"{path}: bertds tokenizes word by word, which needs a pre-tokenizer that splits on "
                    f"whitespace ({', '.join(WHITESPACE_PRE_TOKENIZERS)}), not {pre_tokenizer}; use a "
                    "BERT-style (WordPiece) tokenizer"
                )
            return cls(tokenizer)
        tokens = path.read_text(encoding="utf-8", errors="replace").splitlines()
        if path.suffix != ".txt" or not all(t in tokens for t in BERT_SPECIAL_TOKENS.values()):
            raise UserError(
                f"{path} is not a BERT vocab.txt (one token per line with [PAD] [UNK] [CLS] [SEP] "
                "[MASK]) nor a tokenizer.json; pass one of those, or --tokenizer word/wordpiece"
            )
        cased = any(t[:1].isupper() for t in tokens if not t.startswith("["))
        wordpiece = BertWordPieceTokenizer(str(path), lowercase=not cased, strip_accents=not cased)
        return cls(wordpiece._tokenizer, BERT_SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def first_regular_id(self) -> int:
        """Random MLM replacements are drawn from [first_regular_id, len): never a special token."""
        return self.special_ids[-1] + 1

    def continuation_table(self) -> np.ndarray:
        """``table[id]`` is True for WordPiece continuations (``##x``), for whole-word masking."""
        table = np.zeros(len(self), dtype=bool)
        for token, i in self.tokenizer.get_vocab().items():
            table[i] = token.startswith("##") and len(token) > 2
        return table

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode_words(self, words: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids of a column of whitespace-free words: (flat ids, tokens per word)."""
        encoded = pc.dictionary_encode(words)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        return self.encode_indexed(encoded.dictionary, encoded.indices.to_numpy(zero_copy_only=False))

    def encode_indexed(self, dictionary: pa.Array, word_index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids of the words ``dictionary[word_index]``: (flat ids, tokens per word, None when every word is
        one token). Each distinct word is tokenized once; the same ids as ``encode`` on the joined text for
        tokenizers whose pre-tokenizer splits on whitespace (word-level and BERT's; checked by the tests)."""
        words = dictionary.to_pylist()
        if isinstance(self.tokenizer.model, models.WordLevel):  # one id per word: a dictionary lookup
            table, unk = self.tokenizer.get_vocab(), self.unk_id
            if self.tokenizer.normalizer:  # one call for all words, "\n" (whitespace: in no word) between them
                joined = self.tokenizer.normalizer.normalize_str("\n".join(words)).split("\n")
                normalize = self.tokenizer.normalizer.normalize_str
                words = joined if len(joined) == len(words) else [normalize(w) for w in words]
            ids = np.fromiter((table.get(w, unk) for w in words), dtype=np.int32, count=len(words))
            return ids[word_index], None
        pieces = self.tokenizer.encode_batch_fast(words, add_special_tokens=False)
        lengths = np.fromiter((len(p.ids) for p in pieces), dtype=np.int64, count=len(pieces))
        flat = np.fromiter((i for p in pieces for i in p.ids), dtype=np.int32, count=int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        if (lengths == 1).all():  # word-level vocabularies: one id per word
            return flat[word_index], None
        per_word = lengths[word_index]
        return flat[np.repeat(starts[word_index], per_word) + segment_arange(per_word)], per_word

    def token_ids(self, tokens: list[str]) -> list[int]:
        """Ids of already-split tokens (d2l's ``vocab[tokens]``); unknown tokens map to the unknown id."""
        return [i if (i := self.tokenizer.token_to_id(t)) is not None else self.unk_id for t in tokens]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> Vocab:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no {TOKENIZER_FILE} in {directory}; point at a directory written by bertds")
        return cls(Tokenizer.from_file(str(path)))


def segment_arange(lengths: np.ndarray) -> np.ndarray:
    """``[0..l0-1, 0..l1-1, ...]`` for lengths l0, l1, ...: offsets inside consecutive ranges."""
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def tokenizer_recipe(spec: str, vocab_size: int, min_freq: int) -> dict:
    """What identifies a tokenizer before it is built, for cache keys and manifests."""
    if spec == "word":
        return {"kind": "word", "min_freq": min_freq}
    if spec == "wordpiece":
        return {"kind": "wordpiece", "vocab_size": vocab_size}
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--tokenizer {spec}: no such file; pass word, wordpiece, a BERT vocab.txt or a tokenizer.json")
    return {"kind": "file", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def build_vocab(spec: str, texts: Iterator[str], vocab_size: int, min_freq: int) -> Vocab:
    """The tokenizer ``spec`` names, trained on ``texts`` where it needs training."""
    if spec == "word":
        counts: Counter = Counter()
        for text in texts:
            counts.update(text.lower().split())
        return Vocab.from_word_counts(counts, min_freq)
    if spec == "wordpiece":
        return Vocab.train_wordpiece(texts, vocab_size)
    return Vocab.from_file(Path(spec).expanduser())


def describe_vocab(vocab: Vocab) -> dict:
    return {
        "fingerprint": vocab.fingerprint(),
        "size": len(vocab),
        "special_tokens": vocab.special_tokens,
        "model": json.loads(vocab.tokenizer.to_str())["model"]["type"],
    }
