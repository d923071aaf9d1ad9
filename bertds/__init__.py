"""bertds: distributed BERT pretraining on DeepSpeed."""
import contextlib
import sys

# DeepSpeed's logger writes to the sys.stdout of the moment it is imported, and importing it already logs (e.g.
# "Setting accelerator to CPU"): imported with stdout pointed at stderr, its messages never mix with the machine
# output (JSON) that bertds' command lines print on stdout.
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401
from bertds.data.tokenizer import Vocab
from bertds.encode import encode
from bertds.errors import UserError
from bertds.model import BertConfig, BertForPreTraining, BertModel, get_config
from bertds.pretrained import load_pretrained, save_pretrained

__all__ = ["BertConfig", "BertForPreTraining", "BertModel", "UserError", "Vocab", "encode", "get_config",
           "load_pretrained", "save_pretrained"]
