from bertds.data.config import DataConfig, add_data_arguments, data_config_from_args
from bertds.data.corpus import CorpusSource, load_lines, load_paragraphs
from bertds.data.examples import ExampleConfig, make_examples
from bertds.data.loader import (PreparedData, PretrainingBatches, build_examples, prepare_for_training,
                                prepare_pretraining_data)
from bertds.data.tokenizer import Vocab

__all__ = ["CorpusSource", "DataConfig", "ExampleConfig", "PreparedData", "PretrainingBatches", "Vocab",
           "add_data_arguments", "build_examples", "data_config_from_args", "load_lines", "load_paragraphs",
           "make_examples", "prepare_for_training", "prepare_pretraining_data"]
