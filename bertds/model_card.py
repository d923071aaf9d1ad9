"""The README.md (Hugging Face model card) of an exported directory: what was trained on what, how far, how well,
and how to load it so that it tokenizes as bertds did."""

from __future__ import annotations

import json
from pathlib import Path

MODEL_CARD = "README.md"
RUN_RECORD = "train_config.json"  # written by launcher/pretrain.py at the end of a run
FINETUNE_RECORD = "finetune_config.json"  # written by launcher/finetune_snli.py beside best/

TOKENIZER_ADVICE = {
    "PreTrainedTokenizerFast": (
        "Load the tokenizer with `AutoTokenizer` (or `PreTrainedTokenizerFast`, or through `pipeline`): they read "
        "`tokenizer.json` and give bertds' ids. Do not use `BertTokenizer` / `BertTokenizerFast`: this is d2l's "
        "word-level vocabulary (lower-cased, split on whitespace only), and transformers 5 rebuilds BERT's "
        "WordPiece pipeline for those classes (punctuation split off, accents stripped), which gives other ids. "
        "The directory has no `vocab.txt` for that reason."
    ),
    "BertTokenizerFast": (
        "Any of `AutoTokenizer`, `BertTokenizerFast`, `BertTokenizer` and `pipeline` gives bertds' ids: the "
        "WordPiece vocabulary is BERT's pipeline (`vocab.txt`, `do_lower_case` as trained)."
    ),
}


def read_record(directory: Path, name: str) -> dict | None:
    path = Path(directory) / name
    return json.loads(path.read_text()) if path.is_file() else None


def trained_max_len(record: dict | None) -> int | None:
    return ((record or {}).get("train") or {}).get("data", {}).get("max_len")


def held_out_metrics(result: dict) -> dict[str, float]:
    """Held-out evaluation figures of a run's result (keys starting with ``eval``, flat or one level nested)."""
    metrics: dict[str, float] = {}
    for key, value in result.items():
        if not key.startswith("eval"):
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        metrics.update({f"{key}.{k}" if k else key: v for k, v in items if isinstance(v, (int, float))})
    return metrics


def _front_matter(pipeline_tag: str) -> str:
    return f"---\nlibrary_name: transformers\npipeline_tag: {pipeline_tag}\ntags:\n- bert\n- bertds\n---\n\n"


def _table(rows: dict[str, object]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows.items() if v not in (None, ""))


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def pretraining_card(
    architecture: str,
    record: dict | None,
    checkpoint: str | None,
    max_len: int,
    tokenizer_class: str,
    vocab_size: int,
    directory: str,
) -> str:
    """``record``: the run's train_config.json (None when absent); ``checkpoint``: the DeepSpeed tag exported, whose
    weights are not those the record's final figures describe."""
    train = (record or {}).get("train") or {}
    data = train.get("data") or {}
    result = (record or {}).get("result") or {} if checkpoint is None else {}
    rows = {
        "architecture": f"{architecture} (`BertForPreTraining`: MLM and NSP heads)",
        "corpus": ", ".join(data.get("corpus") or [])
        or (f"WikiText-2 ({data['data_dir'] or 'the hub'})" if data else None),
        "split": data.get("split"),
        "tokenizer": f"{data.get('tokenizer', '?')}, {vocab_size} tokens" if data else f"{vocab_size} tokens",
        "recipe": (
            f"{data.get('recipe')}, sentence task {data.get('sentence_task')}, masking {data.get('masking')}"
            if data
            else None
        ),
        "max_len": f"{max_len} tokens (the tokenizer's `model_max_length`"
        + ("; positions beyond were not trained)" if trained_max_len(record) == max_len else ")"),
        "checkpoint": checkpoint,
        "steps": result.get("steps", None if checkpoint else train.get("max_steps")),
        "global batch": ((record or {}).get("deepspeed") or {}).get("train_batch_size"),
        "learning rate": train.get("lr"),
        "training loss (mean over steps)": (
            f"MLM {result['mlm_loss']:.3f}, NSP {result['nsp_loss']:.3f}" if "mlm_loss" in result else None
        ),
        **{f"held-out {k}": _format(v) for k, v in held_out_metrics(result).items()},
    }
    if record is None:
        rows["training record"] = f"none ({RUN_RECORD} is written when a run finishes)"
    usage = (
        f"```python\nfrom transformers import AutoTokenizer, BertForPreTraining, pipeline\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{directory}")\n'
        f'model = BertForPreTraining.from_pretrained("{directory}")\n'
        f'fill_mask = pipeline("fill-mask", model="{directory}")\n```\n'
    )
    return (
        _front_matter("fill-mask")
        + "# BERT pretrained with bertds\n\n"
        + _table(rows)
        + "\n## How to load\n\n"
        + usage
        + "\n"
        + TOKENIZER_ADVICE[tokenizer_class]
        + "\n\nNext sentence prediction follows Google's "
        "and Hugging Face's convention (`seq_relationship` index 0: B continues A, 1: B is random).\n"
    )


def classifier_card(architecture: str, info: dict, record: dict | None, tokenizer_class: str, directory: str) -> str:
    finetune = (record or {}).get("finetune") or {}
    rows = {
        "architecture": f"{architecture} (`BertForSequenceClassification`)",
        "labels": ", ".join(info["labels"]),
        "max_len": f"{info['max_len']} tokens (premise and hypothesis, cut longest-first)",
        "fine-tuned on": (record or {}).get("result", {}).get("train_source"),
        "epochs": finetune.get("epochs"),
        "learning rate": finetune.get("lr"),
        "best epoch": f"{info.get('epoch')} (selected on {info.get('selected_on')})",
        **{
            f"{k.removesuffix('_acc')} accuracy": f"{v:.4f} ({info.get('eval_sources', {}).get(k[:-4], '')})"
            for k, v in info.get("accuracies", {}).items()
            if k != "train_acc"
        },
    }
    usage = (
        f"```python\nfrom transformers import pipeline\n\n"
        f'classify = pipeline("text-classification", model="{directory}")\n'
        'classify({"text": "A man is sleeping.", "text_pair": "A man is running."})\n```\n'
    )
    return (
        _front_matter("text-classification")
        + "# BERT natural language inference classifier (bertds)\n\n"
        + _table(rows)
        + "\n## How to load\n\n"
        + usage
        + "\n"
        + TOKENIZER_ADVICE[tokenizer_class]
        + "\n"
    )


def write_model_card(directory: str | Path, text: str) -> None:
    (Path(directory) / MODEL_CARD).write_text(text)
