"""bertds: distributed BERT pretraining on DeepSpeed. ``import bertds`` loads the model, the tokenizer and
``encode`` (torch and tokenizers), never ``datasets`` or DeepSpeed: those come with ``bertds.data``'s preparation
and ``bertds.engine`` (which imports DeepSpeed with its start-up messages on stderr)."""

from bertds.data.tokenizer import Vocab
from bertds.encode import encode
from bertds.errors import UserError
from bertds.model import BertConfig, BertForPreTraining, BertModel, get_config
from bertds.pretrained import load_pretrained, save_pretrained

__all__ = [
    "BertConfig",
    "BertForPreTraining",
    "BertModel",
    "UserError",
    "Vocab",
    "encode",
    "get_config",
    "load_pretrained",
    "save_pretrained",
]
