"""Hugging Face interop: bertds weights, configs and vocabularies <-> ``transformers`` ``modeling_bert`` directories.

bertds names follow ``modeling_bert`` except the fused ``qkv`` projection (split into query/key/value for Hugging
Face, concatenated back on import), the layer sub-module names, and the pretraining heads (``mlm``/``nsp`` here,
``cls.predictions``/``cls.seq_relationship`` there). ``transformers`` is an optional dependency (the ``hf`` extra).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from bertds.data.tokenizer import Vocab
from bertds.errors import UserError
from bertds.model import BertConfig, BertForPreTraining

VOCAB_TXT = "vocab.txt"
QKV = ("query", "key", "value")
# Inside bert.encoder.layer.N: bertds sub-module -> modeling_bert sub-module.
LAYER_NAMES = {"attention.dense": "attention.output.dense", "attention_LayerNorm": "attention.output.LayerNorm",
               "intermediate": "intermediate.dense", "output": "output.dense", "output_LayerNorm": "output.LayerNorm"}
HEAD_NAMES = {"mlm.dense": "cls.predictions.transform.dense", "mlm.LayerNorm": "cls.predictions.transform.LayerNorm",
              "nsp.seq_relationship": "cls.seq_relationship"}
# modeling_bert keeps the MLM output bias as cls.predictions.bias and aliases it as the decoder's bias.
HF_DECODER_BIAS = "cls.predictions.decoder.bias"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face export/import needs transformers and safetensors; install them with "
                        "pip install -e '.[hf]'") from None
    return transformers


def weight_names(config: BertConfig) -> dict[str, str | tuple[str, str, str]]:
    """Every bertds weight name -> its modeling_bert name (a (query, key, value) triple for a fused qkv)."""
    names: dict[str, str | tuple[str, str, str]] = {}
    for module in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[f"bert.embeddings.{module}.weight"] = f"bert.embeddings.{module}.weight"
    modules = {"bert.embeddings.LayerNorm": "bert.embeddings.LayerNorm", "bert.pooler.dense": "bert.pooler.dense",
               "mlm.decoder": "cls.predictions.decoder", **HEAD_NAMES}
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


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    hf: dict[str, torch.Tensor] = {}
    for ours, theirs in weight_names(config).items():
        tensor = state_dict[ours].detach().float().cpu()
        if isinstance(theirs, tuple):  # rows of the fused projection: query, then key, then value
            hf.update(zip(theirs, (t.clone() for t in tensor.chunk(3))))
        else:
            hf[theirs] = tensor
    hf[HF_DECODER_BIAS] = hf["cls.predictions.bias"]
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: BertConfig, source: str) -> dict[str, torch.Tensor]:
    names = weight_names(config)
    wanted = {n for theirs in names.values() for n in (theirs if isinstance(theirs, tuple) else (theirs,))}
    missing = sorted(wanted - set(hf))
    if missing:
        raise UserError(f"{source} lacks the BERT weights {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                        "pass a transformers BertForPreTraining (or BertModel + heads) directory")
    return {ours: torch.cat([hf[n] for n in theirs]) if isinstance(theirs, tuple) else hf[theirs]
            for ours, theirs in names.items()}


def to_hf_config(config: BertConfig):
    transformers = require_transformers()
    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id, tie_word_embeddings=config.tie_word_embeddings,
        architectures=["BertForPreTraining"])


def from_hf_config(hf_config, source: str) -> BertConfig:
    """bertds computes exact-GELU, absolute-position, post-LN BERT; other variants are refused, not approximated."""
    if hf_config.hidden_act != "gelu":
        raise UserError(f"{source} uses hidden_act '{hf_config.hidden_act}'; bertds implements BERT's exact "
                        "'gelu' only, so start from a standard BERT checkpoint")
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{source} uses {hf_config.position_embedding_type} position embeddings; bertds has "
                        "absolute ones only, so start from a standard BERT checkpoint")
    return BertConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, ffn_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings, type_vocab_size=hf_config.type_vocab_size,
        dropout=hf_config.hidden_dropout_prob, attention_dropout=hf_config.attention_probs_dropout_prob,
        layer_norm_eps=hf_config.layer_norm_eps, initializer_range=hf_config.initializer_range,
        tie_word_embeddings=getattr(hf_config, "tie_word_embeddings", True),
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0)


def hf_tokenizer(vocab: Vocab, model_max_length: int):
    """A ``transformers`` fast tokenizer that tokenizes exactly as ``vocab`` and packs ``<cls> A <sep> B <sep>``
    with token type ids 0/1, as bertds does (for the word vocabulary HF's BertTokenizer would split differently)."""
    transformers = require_transformers()
    tokenizer = Tokenizer.from_str(vocab.tokenizer.to_str())
    cls, sep = vocab.special_tokens["cls"], vocab.special_tokens["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab.cls_id), (sep, vocab.sep_id)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        **{f"{role}_token": token for role, token in vocab.special_tokens.items()})


def save_hf(model: BertForPreTraining, vocab: Vocab, directory: str | Path) -> Path:
    """Writes a directory ``transformers.BertForPreTraining.from_pretrained`` loads: config.json, model.safetensors,
    vocab.txt (tokens in id order), tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    transformers = require_transformers()
    directory = Path(directory)
    hf_model = transformers.BertForPreTraining(to_hf_config(model.config))
    hf_model.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=True)
    hf_model.save_pretrained(directory)  # safetensors; a tied decoder is stored once
    hf_tokenizer(vocab, model.config.max_position_embeddings).save_pretrained(directory)
    by_id = sorted(vocab.tokenizer.get_vocab().items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UserError("the vocabulary's ids are not contiguous from 0, so no vocab.txt can list them; "
                        "rebuild the tokenizer with bertds")
    (directory / VOCAB_TXT).write_text("".join(f"{token}\n" for token, _ in by_id))
    return directory


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
        raise UserError(f"the tokenizer in {directory} defines no {', '.join(absent)} token; BERT needs "
                        "unk/pad/mask/cls/sep, set them in its tokenizer_config.json")
    return Vocab(Tokenizer.from_str(hf.backend_tokenizer.to_str()), special)


def load_hf_pretrained(directory: str | Path) -> tuple[BertForPreTraining, Vocab]:
    """(bertds model in eval mode, vocabulary) from a Hugging Face BERT directory, e.g. a downloaded
    ``bert-base-uncased`` or one written by ``save_hf``. transformers reads the weights (safetensors or .bin,
    legacy gamma/beta names); heads the directory lacks are freshly initialised by transformers, with its warning."""
    transformers = require_transformers()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a Hugging Face model directory (no config.json); pass the directory "
                        "of a downloaded BERT or of python -m bertds.export")
    hf_model = transformers.BertForPreTraining.from_pretrained(str(directory), dtype=torch.float32)
    config = from_hf_config(hf_model.config, str(directory))
    model = BertForPreTraining(config)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), config, str(directory)))
    vocab = load_hf_vocab(directory)
    if len(vocab) > config.vocab_size:
        raise UserError(f"{directory}: the tokenizer has {len(vocab)} tokens but the model only "
                        f"{config.vocab_size} embeddings; the tokenizer belongs to another model")
    return model.eval(), vocab


def check_same_vocabulary(vocab: Vocab, hf_vocab: Vocab, directory: str | Path) -> None:
    """Weights from ``directory`` are only meaningful with the token ids they were trained with."""
    if vocab.tokenizer.get_vocab() != hf_vocab.tokenizer.get_vocab():
        raise UserError(f"--init-from-hf {directory} was trained with another vocabulary ({len(hf_vocab)} tokens) "
                        f"than this run's ({len(vocab)}); tokenize the data with the tokenizer in {directory}")
