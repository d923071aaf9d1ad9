from bertds.data.config import DataConfig, add_data_arguments, data_config_from_args
from bertds.data.corpus import Corpus, CorpusSource, load_lines, load_paragraphs, resolve_corpus
from bertds.data.examples import ExampleConfig
from bertds.data.loader import (PreparedData, PretrainingBatches, build_examples, prepare_for_training,
                                prepare_pretraining_data)
from bertds.data.masking import MaskingSpec
from bertds.data.prepare import TokenizerChoice, load_prepared, prepare_directory
from bertds.data.tokenizer import Vocab

__all__ = ["Corpus", "CorpusSource", "DataConfig", "ExampleConfig", "MaskingSpec", "PreparedData",
           "PretrainingBatches", "TokenizerChoice", "Vocab", "add_data_arguments", "build_examples",
           "data_config_from_args", "load_lines", "load_paragraphs", "load_prepared", "prepare_directory",
           "prepare_for_training", "prepare_pretraining_data", "resolve_corpus"]
