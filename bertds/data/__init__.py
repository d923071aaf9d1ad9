"""The data package, in the order data flows: ``corpus`` (text) -> ``tokenizer`` -> ``d2l`` / ``bert_examples``
(the two recipes' pairs) -> ``examples`` (packing) and ``masking`` -> ``shards`` (the prepared-directory format)
-> ``prepare`` (what to build or reuse: cache, ``--prepared``, ranks) -> ``loader`` (batches); ``config`` holds the
flags. Names are imported from their modules on first use, so ``import bertds.data`` loads neither ``datasets``
nor DeepSpeed."""

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "add_data_arguments": "config",
    "data_config_from_args": "config",
    "Corpus": "corpus",
    "resolve_corpus": "corpus",
    "ExampleConfig": "examples",
    "MaskingSpec": "masking",
    "PreparedData": "shards",
    "load_prepared": "shards",
    "TokenizerChoice": "prepare",
    "build_examples": "prepare",
    "prepare_directory": "prepare",
    "prepare_for_training": "prepare",
    "prepare_pretraining_data": "prepare",
    "PretrainingBatches": "loader",
    "Vocab": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bertds.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bertds.data.{_EXPORTS[name]}"), name)
