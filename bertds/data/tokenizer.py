"""Vocabularies as Hugging Face ``tokenizers`` objects.

The default is d2l's word-level vocabulary: whitespace-split words seen at least ``min_freq`` times, plus the
reserved tokens ``<unk> <pad> <mask> <cls> <sep>`` at ids 0-4.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from bertds.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
D2L_SPECIAL_TOKENS = {"unk": "<unk>", "pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "sep": "<sep>"}


class Vocab:
    """A ``tokenizers.Tokenizer`` plus the ids of the special tokens BERT needs."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str] = D2L_SPECIAL_TOKENS):
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        ids = {role: tokenizer.token_to_id(token) for role, token in special_tokens.items()}
        missing = [special_tokens[role] for role, i in ids.items() if i is None]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}; build it with bertds")
        self.unk_id, self.pad_id, self.mask_id, self.cls_id, self.sep_id = (
            ids["unk"], ids["pad"], ids["mask"], ids["cls"], ids["sep"])
        self.special_ids = sorted(ids.values())

    @classmethod
    def train_word_level(cls, sentences: Iterable[str], min_freq: int = 5) -> "Vocab":
        # Counted here rather than with tokenizers' WordLevelTrainer: that trainer gives a corpus word equal to
        # a special token (WikiText is full of "<unk>") a second id and leaves a hole at the special's id.
        counts = Counter(word for sentence in sentences for word in sentence.lower().split())
        reserved = list(D2L_SPECIAL_TOKENS.values())
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in reserved),
                       key=lambda w: (-counts[w], w))
        token_to_id = {token: i for i, token in enumerate(reserved + words)}
        tokenizer = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token=D2L_SPECIAL_TOKENS["unk"]))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return cls(tokenizer)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def token_ids(self, tokens: list[str]) -> list[int]:
        """Ids of already-split tokens (d2l's ``vocab[tokens]``); unknown tokens map to the unknown id."""
        return [self.tokenizer.token_to_id(t) if self.tokenizer.token_to_id(t) is not None else self.unk_id
                for t in tokens]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "Vocab":
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no {TOKENIZER_FILE} in {directory}; point at a directory written by bertds")
        return cls(Tokenizer.from_file(str(path)))
