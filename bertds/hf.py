"""Hugging Face interop: bertds weights, configs and vocabularies <-> ``transformers`` ``modeling_bert`` directories.

bertds names follow ``modeling_bert`` except the fused ``qkv`` projection (split into query/key/value for Hugging
Face, concatenated back on import), the layer sub-module names, and the pretraining heads (``mlm``/``nsp`` here,
``cls.predictions``/``cls.seq_relationship`` there). ``transformers`` is an optional dependency (the ``hf`` extra).

NSP: bertds' data label and head index 1 mean "B follows A" (0: B is a random sentence); Hugging Face's and Google's
``seq_relationship`` use index 0 for "B continues A" (``next_sentence_label``). The two rows of the head are swapped
on export and on import, so an exported ``BertForNextSentencePrediction`` and bertds agree on which pairs follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, processors

from bertds.data.tokenizer import Vocab
from bertds.errors import UserError
from bertds.model import BertConfig, BertForPreTraining

if TYPE_CHECKING:
    from bertds.tasks.classifier import BertClassifier

VOCAB_TXT = "vocab.txt"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
QKV = ("query", "key", "value")
# Inside bert.encoder.layer.N: bertds sub-module -> modeling_bert sub-module.
LAYER_NAMES = {
    "attention.dense": "attention.output.dense",
    "attention_LayerNorm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_LayerNorm": "output.LayerNorm",
}
NSP_HEAD = "nsp.seq_relationship"
HEAD_NAMES = {
    "mlm.dense": "cls.predictions.transform.dense",
    "mlm.LayerNorm": "cls.predictions.transform.LayerNorm",
    NSP_HEAD: "cls.seq_relationship",
}
CLASSIFIER_NAMES = {"output.weight": "classifier.weight", "output.bias": "classifier.bias"}
# Every BertConfig field -> its transformers.BertConfig name, used both ways. pre_layernorm and sentence_loss are
# bertds' own: config.json keeps them, transformers ignores them.
CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "ffn_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings",
    "pad_token_id": "pad_token_id",
    "pre_layernorm": "pre_layernorm",
    "sentence_loss": "sentence_loss",
}
# modeling_bert keeps the MLM output bias as cls.predictions.bias and aliases it as the decoder's bias.
HF_DECODER_BIAS = "cls.predictions.decoder.bias"
# BertTokenizer(Fast) rebuilds its pipeline from these (transformers 5 ignores tokenizer.json's for it).
WORDPIECE_DEFAULTS = {"continuing_subword_prefix": "##", "max_input_chars_per_word": 100}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(
            "Hugging Face export/import needs transformers and safetensors; install them with pip install -e '.[hf]'"
        ) from None
    return transformers


def weight_names(config: BertConfig) -> dict[str, str | tuple[str, ...]]:
    """Every bertds weight name -> its modeling_bert name (a (query, key, value) triple for a fused qkv)."""
    names: dict[str, str | tuple[str, ...]] = {}
    for module in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[f"bert.embeddings.{module}.weight"] = f"bert.embeddings.{module}.weight"
    modules = {
        "bert.embeddings.LayerNorm": "bert.embeddings.LayerNorm",
        "bert.pooler.dense": "bert.pooler.dense",
        "mlm.decoder": "cls.predictions.decoder",
        **HEAD_NAMES,
    }
    for i in range(config.num_layers):
        layer = f"bert.encoder.layer.{i}"
        modules.update({f"{layer}.{ours}": f"{layer}.{theirs}" for ours, theirs in LAYER_NAMES.items()})
        for kind in ("weight", "bias"):
            names[f"{layer}.attention.qkv.{kind}"] = tuple(f"{layer}.attention.self.{p}.{kind}" for p in QKV)
    for ours, theirs in modules.items():
        for kind in ("weight", "bias"):
            names[f"{ours}.{kind}"] = f"{theirs}.{kind}"
    names["mlm.decoder.bias"] = "cls.predictions.bias"
    return names


def classifier_weight_names(config: BertConfig) -> dict[str, str | tuple[str, ...]]:
    """``BertClassifier`` (encoder, pooler, output layer) -> ``BertForSequenceClassification``."""
    encoder = {ours: theirs for ours, theirs in weight_names(config).items() if ours.startswith("bert.")}
    return {**encoder, **CLASSIFIER_NAMES}


def _nsp_mapped(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The NSP head with its two rows swapped: bertds' 1 = follows <-> Hugging Face's 0 = continues (module doc)."""
    return tensor.flip(0) if name.startswith(NSP_HEAD) else tensor


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], config: BertConfig, names: dict | None = None
) -> dict[str, torch.Tensor]:
    hf: dict[str, torch.Tensor] = {}
    for ours, theirs in (names or weight_names(config)).items():
        tensor = _nsp_mapped(ours, state_dict[ours].detach().float().cpu())
        if isinstance(theirs, tuple):  # rows of the fused projection: query, then key, then value
            hf.update(zip(theirs, (t.clone() for t in tensor.chunk(3))))
        else:
            hf[theirs] = tensor
    if "cls.predictions.bias" in hf:
        hf[HF_DECODER_BIAS] = hf["cls.predictions.bias"]
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: BertConfig, source: str) -> dict[str, torch.Tensor]:
    names = weight_names(config)
    wanted = {n for theirs in names.values() for n in (theirs if isinstance(theirs, tuple) else (theirs,))}
    missing = sorted(wanted - set(hf))
    if missing:
        raise UserError(
            f"{source} lacks the BERT weights {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
            "pass a transformers BertForPreTraining (or BertModel + heads) directory"
        )
    return {
        ours: _nsp_mapped(ours, torch.cat([hf[n] for n in theirs]) if isinstance(theirs, tuple) else hf[theirs])
        for ours, theirs in names.items()
    }


def check_post_layernorm(pre_layernorm: bool, source: str) -> None:
    if pre_layernorm:
        raise UserError(
            f"{source} is a pre-LayerNorm model (--pre-ln); Hugging Face's BertForPreTraining is "
            "post-LN and would compute something else from its weights, so it is neither exported nor "
            "imported: use it with bertds (bertds.load_pretrained), or train without --pre-ln to export"
        )


def to_hf_config(config: BertConfig, **extra):
    """transformers' BertConfig of ``config`` (every field, through CONFIG_NAMES); ``extra`` adds e.g. the labels of
    a classifier."""
    transformers = require_transformers()
    check_post_layernorm(config.pre_layernorm, "the model")
    values = {theirs: getattr(config, ours) for ours, theirs in CONFIG_NAMES.items()}
    return transformers.BertConfig(hidden_act="gelu", **{**values, "architectures": ["BertForPreTraining"], **extra})


def from_hf_config(hf_config, source: str) -> BertConfig:
    """The bertds config of a transformers BertConfig (a field it lacks, or leaves None, keeps bertds' default).
    bertds computes exact-GELU, absolute-position, post-LN BERT; other variants are refused, not approximated."""
    check_post_layernorm(getattr(hf_config, "pre_layernorm", False), source)
    if hf_config.hidden_act != "gelu":
        raise UserError(
            f"{source} uses hidden_act '{hf_config.hidden_act}'; bertds implements BERT's exact "
            "'gelu' only, so start from a standard BERT checkpoint"
        )
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise UserError(
            f"{source} uses {hf_config.position_embedding_type} position embeddings; bertds has "
            "absolute ones only, so start from a standard BERT checkpoint"
        )
    values = {ours: getattr(hf_config, theirs, None) for ours, theirs in CONFIG_NAMES.items()}
    return BertConfig(**{ours: value for ours, value in values.items() if value is not None})


def describe_architecture(config: BertConfig) -> str:
    return f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads, FFN {config.ffn_size}"


def loaded_model_name(config: BertConfig, directory: str) -> str:
    """What a run started from a Hugging Face directory records as its model (not the unused --model preset)."""
    return f"{describe_architecture(config)} from {directory}"


def bert_tokenizer_settings(vocab: Vocab) -> dict | None:
    """The ``BertTokenizer(Fast)`` arguments that rebuild exactly ``vocab``'s tokenization from vocab.txt, or None
    when none do: BERT's basic tokenizer splits punctuation and strips accents, d2l's word vocabulary does not."""
    spec = json.loads(vocab.tokenizer.to_str())
    model, normalizer = spec["model"], spec.get("normalizer") or {}
    is_bert = (
        model["type"] == "WordPiece"
        and model.get("unk_token") == vocab.special_tokens["unk"]
        and all(model.get(k) == v for k, v in WORDPIECE_DEFAULTS.items())
        and normalizer.get("type") == "BertNormalizer"
        and normalizer.get("clean_text")
        and normalizer.get("handle_chinese_chars")
        and (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
    )
    if not is_bert:
        return None
    return {
        "do_lower_case": normalizer["lowercase"],
        "strip_accents": normalizer["strip_accents"],
        "tokenize_chinese_chars": True,
    }


def hf_tokenizer(vocab: Vocab, model_max_length: int):
    """A ``transformers`` fast tokenizer that tokenizes exactly as ``vocab`` and packs ``<cls> A <sep> B <sep>``
    with token type ids 0/1, as bertds does (for the word vocabulary HF's BertTokenizer would split differently)."""
    transformers = require_transformers()
    tokenizer = Tokenizer.from_str(vocab.tokenizer.to_str())
    cls, sep = vocab.special_tokens["cls"], vocab.special_tokens["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab.cls_id), (sep, vocab.sep_id)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        model_input_names=MODEL_INPUT_NAMES,
        **{f"{role}_token": token for role, token in vocab.special_tokens.items()},
    )


def save_hf_tokenizer(vocab: Vocab, directory: Path, max_len: int) -> str:
    """tokenizer.json, a tokenizer_config.json that transformers 4.57 and 5 read alike, special_tokens_map.json, and
    vocab.txt where BERT's tokenizer reproduces ``vocab`` from it. Returns the tokenizer class to load it with."""
    settings = bert_tokenizer_settings(vocab)
    # Written by hand: transformers 5's save_pretrained names a class ("TokenizersBackend") 4.x does not have.
    tokenizer_class = "BertTokenizerFast" if settings is not None else "PreTrainedTokenizerFast"
    special = {f"{role}_token": token for role, token in vocab.special_tokens.items()}
    hf_tokenizer(vocab, max_len).backend_tokenizer.save(str(directory / TOKENIZER_JSON))
    config = {
        "tokenizer_class": tokenizer_class,
        "model_max_length": max_len,
        "model_input_names": MODEL_INPUT_NAMES,
        "clean_up_tokenization_spaces": False,
        **special,
        **(settings or {}),
    }
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (directory / SPECIAL_TOKENS_MAP).write_text(json.dumps(special, indent=2) + "\n")
    if settings is not None:
        by_id = sorted(vocab.tokenizer.get_vocab().items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise UserError(
                "the vocabulary's ids are not contiguous from 0, so no vocab.txt can list them; "
                "rebuild the tokenizer with bertds"
            )
        (directory / VOCAB_TXT).write_text("".join(f"{token}\n" for token, _ in by_id))
    return tokenizer_class


def _save(hf_model, vocab: Vocab, directory: str | Path, max_len: int) -> str:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(directory)  # safetensors; a tied decoder is stored once
    return save_hf_tokenizer(vocab, directory, max_len)


def save_hf(model: BertForPreTraining, vocab: Vocab, directory: str | Path, max_len: int | None = None) -> str:
    """Writes a directory ``transformers.BertForPreTraining.from_pretrained`` loads: config.json, model.safetensors
    and the tokenizer files (``save_hf_tokenizer``; ``max_len``: the trained length, default all positions).
    Returns the tokenizer class that reproduces bertds' ids."""
    transformers = require_transformers()
    hf_model = transformers.BertForPreTraining(to_hf_config(model.config))
    hf_model.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=True)
    return _save(hf_model, vocab, directory, max_len or model.config.max_position_embeddings)


def save_hf_classifier(
    classifier: BertClassifier, vocab: Vocab, labels: list[str], directory: str | Path, max_len: int
) -> str:
    """A fine-tuned ``BertClassifier`` as a ``transformers.BertForSequenceClassification`` directory, with its
    labels as ``id2label`` / ``label2id``. Returns the tokenizer class (see ``save_hf``)."""
    transformers = require_transformers()
    config = classifier.bert.config
    hf_config = to_hf_config(
        config,
        architectures=["BertForSequenceClassification"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="single_label_classification",
    )
    hf_model = transformers.BertForSequenceClassification(hf_config)
    hf_model.load_state_dict(
        to_hf_state_dict(classifier.state_dict(), config, classifier_weight_names(config)), strict=True
    )
    return _save(hf_model, vocab, directory, max_len)


def is_hf_directory(directory: str | Path) -> bool:
    """A transformers model directory (its config.json names a model_type; bertds' own config.json does not)."""
    config = Path(directory) / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def load_hf_vocab(directory: str | Path) -> Vocab:
    """The tokenizer of a Hugging Face BERT directory (tokenizer.json, or vocab.txt + tokenizer_config.json) as a
    bertds ``Vocab`` with its own special tokens."""
    transformers = require_transformers()
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    if not hasattr(hf, "backend_tokenizer"):
        raise UserError(f"{directory} has no fast (tokenizers) tokenizer; add its tokenizer.json or vocab.txt")
    special = {role: getattr(hf, f"{role}_token") for role in ("unk", "pad", "mask", "cls", "sep")}
    absent = [role for role, token in special.items() if token is None]
    if absent:
        raise UserError(
            f"the tokenizer in {directory} defines no {', '.join(absent)} token; BERT needs "
            "unk/pad/mask/cls/sep, set them in its tokenizer_config.json"
        )
    return Vocab(Tokenizer.from_str(hf.backend_tokenizer.to_str()), special)


def load_hf_pretrained(directory: str | Path) -> tuple[BertForPreTraining, Vocab]:
    """(bertds model in eval mode, vocabulary) from a Hugging Face BERT directory, e.g. a downloaded
    ``bert-base-uncased`` or one written by ``save_hf``. transformers reads the weights (safetensors or .bin,
    legacy gamma/beta names); heads the directory lacks are freshly initialised by transformers, with its warning."""
    transformers = require_transformers()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(
            f"{directory} is not a Hugging Face model directory (no config.json); pass the directory "
            "of a downloaded BERT or of python -m bertds.export"
        )
    hf_model = transformers.BertForPreTraining.from_pretrained(str(directory), dtype=torch.float32)
    config = from_hf_config(hf_model.config, str(directory))
    model = BertForPreTraining(config)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), config, str(directory)))
    vocab = load_hf_vocab(directory)
    if len(vocab) > config.vocab_size:
        raise UserError(
            f"{directory}: the tokenizer has {len(vocab)} tokens but the model only "
            f"{config.vocab_size} embeddings; the tokenizer belongs to another model"
        )
    return model.eval(), vocab


def check_same_vocabulary(vocab: Vocab, hf_vocab: Vocab, directory: str | Path) -> None:
    """Weights from ``directory`` are only meaningful with the token ids they were trained with."""
    if vocab.tokenizer.get_vocab() != hf_vocab.tokenizer.get_vocab():
        raise UserError(
            f"--init-from-hf {directory} was trained with another vocabulary ({len(hf_vocab)} tokens) "
            f"than this run's ({len(vocab)}); tokenize the data with the tokenizer in {directory}"
        )
