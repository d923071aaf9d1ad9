from bertds.model.bert import BertForPreTraining, BertModel, num_parameters
from bertds.model.config import MODEL_PRESETS, BertConfig, get_config

__all__ = ["BertConfig", "BertForPreTraining", "BertModel", "MODEL_PRESETS", "get_config", "num_parameters"]
