"""Typed model configuration and the named presets (tiny/small/base/large)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from bertds.errors import UserError


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    pre_layernorm: bool = False  # pre-LN blocks + a final LayerNorm; False: BERT's post-LN blocks
    sentence_loss: bool = True  # False: MLM only (RoBERTa, --sentence-task none): no NSP/SOP term in the loss

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick a head count that divides the hidden size"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BertConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown model config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BertConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# layers / hidden / heads / FFN. tiny is the d2l recipe (dropout 0.2), small is d2l's bert.small.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=2, ffn_size=256, dropout=0.2, attention_dropout=0.2),
    "small": dict(num_layers=2, hidden_size=256, num_heads=4, ffn_size=512),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, ffn_size=3072),
    "large": dict(num_layers=24, hidden_size=1024, num_heads=16, ffn_size=4096),
}


def get_config(name: str, **overrides) -> BertConfig:
    """A named preset with overrides (vocab_size, dropout, ...); raises a UserError for unknown names."""
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model '{name}'; choose one of {', '.join(MODEL_PRESETS)}")
    values = {**MODEL_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return BertConfig(**values)
