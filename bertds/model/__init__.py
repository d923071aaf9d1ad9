from bertds.model.bert import BertForPreTraining, BertForPreTrainingOutput, BertModel, num_parameters
from bertds.model.config import MODEL_PRESETS, BertConfig, get_config

__all__ = [
    "BertConfig",
    "BertForPreTraining",
    "BertForPreTrainingOutput",
    "BertModel",
    "MODEL_PRESETS",
    "get_config",
    "num_parameters",
]
