"""bertds: distributed BERT pretraining on DeepSpeed."""
from bertds.data.tokenizer import Vocab
from bertds.encode import encode
from bertds.errors import UserError
from bertds.model import BertConfig, BertForPreTraining, BertModel, get_config
from bertds.pretrained import load_pretrained, save_pretrained

__all__ = ["BertConfig", "BertForPreTraining", "BertModel", "UserError", "Vocab", "encode", "get_config",
           "load_pretrained", "save_pretrained"]
