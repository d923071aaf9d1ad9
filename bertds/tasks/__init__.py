"""After pretraining: fine-tuning on sentence-pair tasks (SNLI)."""

from bertds.tasks.classifier import BertClassifier, load_classifier, save_classifier
from bertds.tasks.nli import LABELS, NLIPairs, TokenizedPairs, load_split, read_nli_file

__all__ = [
    "BertClassifier",
    "LABELS",
    "NLIPairs",
    "TokenizedPairs",
    "load_classifier",
    "load_split",
    "read_nli_file",
    "save_classifier",
]
