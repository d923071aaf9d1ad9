"""Loads an exported directory every documented transformers way and reports what each gives, as JSON.

Plain transformers code (no bertds import), so that the tests can run it in another interpreter with another
transformers version (``BERTDS_HF_LEGACY_PYTHON``):

    python tests/hf_loading.py DIR '{"texts": [["a crane", "he left"]], "model": "BertForPreTraining"}'
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

LEGACY_PYTHON = os.environ.get("BERTDS_HF_LEGACY_PYTHON")  # an interpreter with the oldest supported transformers

TOKENIZER_CLASSES = ("AutoTokenizer", "PreTrainedTokenizerFast", "BertTokenizerFast", "BertTokenizer")


def tokenize_every_way(directory: str, texts: list[list[str]]) -> dict:
    """Per tokenizer class: its ids for each (text, pair or None) and its model_max_length, or the error."""
    results = {}
    for name in TOKENIZER_CLASSES:
        try:
            tokenizer = getattr(transformers, name).from_pretrained(directory)
        except Exception as e:  # reported, the test decides which classes must load
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        encoded = [tokenizer(a, b) for a, b in texts]
        results[name] = {
            "class": type(tokenizer).__name__,
            "model_max_length": tokenizer.model_max_length,
            "input_ids": [e["input_ids"] for e in encoded],
            "token_type_ids": [e["token_type_ids"] for e in encoded],
        }
    return results


def model_outputs(directory: str, model_class: str, texts: list[list[str]]) -> dict:
    """The model's logits on the AutoTokenizer encoding of the pairs among ``texts`` (one padded batch), and its
    config's labels."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = getattr(transformers, model_class).from_pretrained(directory).eval()
    pairs = [(a, b) for a, b in texts if b is not None]
    batch = tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    logits = {k: v.tolist() for k, v in out.items() if k.endswith("logits")}
    return {
        "logits": logits,
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "max_position_embeddings": model.config.max_position_embeddings,
    }


def fill_mask(directory: str, text: str) -> list[int]:
    return [r["token"] for r in transformers.pipeline("fill-mask", model=directory, top_k=3)(text)]


def report(directory: str, request: dict) -> dict:
    result = {
        "version": transformers.__version__,
        "tokenizers": tokenize_every_way(directory, request["texts"]),
        "model": model_outputs(directory, request["model"], request["texts"]),
    }
    if "fill_mask" in request:
        result["fill_mask"] = fill_mask(directory, request["fill_mask"])
    return result


def legacy_report(directory, request: dict) -> dict:
    """``report`` computed by ``LEGACY_PYTHON``."""
    result = subprocess.run(
        [LEGACY_PYTHON, __file__, str(directory), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(report(sys.argv[1], json.loads(sys.argv[2]))))
