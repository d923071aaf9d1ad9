"""Loading any bertds checkpoint, and exporting it as a Hugging Face directory.

    python -m bertds.export --checkpoint runs/pretrain --out runs/pretrain-hf

``--checkpoint`` is a finished run (``model.pt``), or a DeepSpeed checkpoint: a directory with a ``latest`` file
(``OUTPUT/checkpoints``), a run directory holding one, or one tag directory. ZeRO checkpoints are consolidated to
fp32 with DeepSpeed's ``zero_to_fp32`` first.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from bertds.data.tokenizer import Vocab
from bertds.errors import UserError
from bertds.model import BertConfig, BertForPreTraining
from bertds.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_pretrained

LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module file without ZeRO-3 (ZeRO-3: zero_pp_rank_*_...)


def find_deepspeed_checkpoint(path: Path) -> tuple[Path, str] | None:
    """(directory holding ``latest``, tag) for a DeepSpeed checkpoint at ``path``, or None."""
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return root, (root / LATEST).read_text().strip()
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint: ZeRO partitions are merged by zero_to_fp32; without ZeRO the module
    file holds them whole."""
    checkpoint = root / tag
    if any(checkpoint.glob("*_optim_states.pt")):  # written by ZeRO stages 1-3
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(sys.stderr):  # it reports its progress on stdout
            return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    if not (checkpoint / MODEL_STATES).is_file():
        raise UserError(f"{checkpoint} holds no DeepSpeed model states ({MODEL_STATES}); the checkpoint is "
                        "incomplete, pick another one")
    return torch.load(checkpoint / MODEL_STATES, map_location="cpu", weights_only=False)["module"]


def load_checkpoint(path: str | Path) -> tuple[BertForPreTraining, Vocab]:
    """(model in eval mode on the CPU, vocabulary) from a finished run or a DeepSpeed checkpoint (see module doc)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist; pass a finished run's --output-dir or a DeepSpeed "
                        "checkpoint directory")
    if (path / WEIGHTS_FILE).is_file():
        return load_pretrained(path)
    found = find_deepspeed_checkpoint(path)
    if found is None:
        raise UserError(f"{path} is neither a finished bertds run (no {WEIGHTS_FILE}) nor a DeepSpeed checkpoint "
                        f"(no '{LATEST}' file, no *model_states.pt); pass a run's --output-dir or its checkpoints/")
    root, tag = found
    # bertds writes config.json and tokenizer.json into each tag directory; a run directory holds them too.
    metadata = next((d for d in (root / tag, root, root.parent) if (d / CONFIG_FILE).is_file()), None)
    if metadata is None:
        raise UserError(f"no {CONFIG_FILE} beside the DeepSpeed checkpoint {root / tag}; copy the run's "
                        f"{CONFIG_FILE} and tokenizer.json into it")
    config, vocab = BertConfig.load(metadata / CONFIG_FILE), Vocab.load(metadata)
    model = BertForPreTraining(config)
    model.load_state_dict(consolidated_state_dict(root, tag))
    return model.eval(), vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="finished run directory or DeepSpeed checkpoint")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write")
    args = parser.parse_args(argv)
    try:
        from bertds.hf import save_hf
        model, vocab = load_checkpoint(args.checkpoint)
        out = save_hf(model, vocab, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"exported {args.checkpoint} to {out}: transformers.BertForPreTraining.from_pretrained('{out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
