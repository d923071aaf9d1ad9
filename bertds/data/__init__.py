from bertds.data.corpus import CorpusSource, load_lines, load_paragraphs
from bertds.data.examples import ExampleConfig, make_examples
from bertds.data.loader import PreparedData, PretrainingBatches, build_examples, prepare_pretraining_data
from bertds.data.tokenizer import Vocab

__all__ = ["CorpusSource", "ExampleConfig", "PreparedData", "PretrainingBatches", "Vocab", "build_examples",
           "load_lines", "load_paragraphs", "make_examples", "prepare_pretraining_data"]
