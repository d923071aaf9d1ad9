"""Sentence-pair classifier on a pretrained BERT (d2l's ``BERTClassifier``), and its saved form."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bertds.data.tokenizer import Vocab
from bertds.errors import UserError
from bertds.model import BertConfig, BertModel
from bertds.pretrained import CONFIG_FILE, load_weights, save_pretrained

CLASSIFIER_FILE = "classifier.json"  # labels, max_len and the accuracies of the saved epoch


class BertClassifier(nn.Module):
    """The pretrained encoder and pooler with a new output layer on the pooled ``<cls>``. The pretraining heads
    (MLM, NSP) are not part of it, so they are neither used nor updated."""

    def __init__(self, bert: BertModel, num_classes: int):
        super().__init__()
        self.bert = bert
        self.output = nn.Linear(bert.config.hidden_size, num_classes)
        nn.init.normal_(self.output.weight, std=bert.config.initializer_range)
        nn.init.zeros_(self.output.bias)

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor, valid_lens: torch.Tensor) -> torch.Tensor:
        return self.output(self.bert.pooler(self.bert(tokens, segments, valid_lens)))


def save_classifier(
    state_dict: dict[str, torch.Tensor], config: BertConfig, vocab: Vocab, info: dict, directory: str | Path
) -> None:
    save_pretrained(state_dict, config, vocab, directory)
    (Path(directory) / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_classifier(directory: str | Path) -> tuple[BertClassifier, Vocab, dict]:
    """(classifier in eval mode, vocabulary, info) from a directory written by ``save_classifier``."""
    directory = Path(directory)
    if not (directory / CLASSIFIER_FILE).is_file():
        raise UserError(f"{directory} holds no {CLASSIFIER_FILE}; pass the best/ directory of a fine-tuning run")
    info = json.loads((directory / CLASSIFIER_FILE).read_text())
    model = BertClassifier(BertModel(BertConfig.load(directory / CONFIG_FILE)), len(info["labels"]))
    model.load_state_dict(load_weights(directory))
    return model.eval(), Vocab.load(directory), info
