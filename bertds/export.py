"""Loading any bertds checkpoint, and exporting it as a Hugging Face directory.

    python -m bertds.export --checkpoint runs/pretrain --out runs/pretrain-hf [--push-to-hub USER/NAME]
    python -m bertds.export --checkpoint runs/finetune_snli/best --out runs/snli-hf

``--checkpoint`` is a finished run (``model.pt``), or a DeepSpeed checkpoint: a directory with a ``latest`` file
(``OUTPUT/checkpoints``), a run directory holding one, or one tag directory. ZeRO checkpoints are consolidated to
fp32 with DeepSpeed's ``zero_to_fp32`` first. A pretrained model becomes a ``BertForPreTraining`` directory, a
fine-tuned classifier (a fine-tuning run's ``best/``) a ``BertForSequenceClassification`` one; both get the
tokenizer files, the trained max_len as the tokenizer's ``model_max_length``, and a model card (README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from bertds import safe_load
from bertds.data.tokenizer import Vocab
from bertds.engine.checkpoint import LATEST, locate, verified
from bertds.errors import UserError, run_cli
from bertds.model import BertConfig, BertForPreTraining
from bertds.model_card import (
    FINETUNE_RECORD,
    RUN_RECORD,
    classifier_card,
    pretraining_card,
    read_record,
    trained_max_len,
    write_model_card,
)
from bertds.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_pretrained
from bertds.tasks.classifier import CLASSIFIER_FILE, load_classifier

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module file without ZeRO-3 (ZeRO-3: zero_pp_rank_*_...)


def consolidated_state_dict(checkpoint: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights of a verified DeepSpeed checkpoint directory: ZeRO partitions are merged by zero_to_fp32 (which
    unpickles fully, so the files were checked first); without ZeRO the module file holds them whole."""
    if any(checkpoint.glob("*_optim_states.pt")):  # written by ZeRO stages 1-3
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it reports its progress on stdout
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if not (checkpoint / MODEL_STATES).is_file():
        raise UserError(
            f"{checkpoint} holds no DeepSpeed model states ({MODEL_STATES}); the checkpoint is "
            "incomplete, pick another one"
        )
    return safe_load.load(checkpoint / MODEL_STATES, trust=trust)["module"]


def find_deepspeed_checkpoint(path: Path, trust: bool = False) -> Path | None:
    """The DeepSpeed checkpoint directory at ``path`` that verifies (see ``bertds.engine.checkpoint.locate``;
    a damaged ``latest`` falls back to the newest complete one, saying so), or None if there is none."""
    found = locate(path)
    return None if found is None else verified(found, trust, require_manifest=False)


def load_deepspeed_checkpoint(path: Path, trust: bool = False) -> tuple[BertForPreTraining, Vocab, Path]:
    """(model, vocabulary, checkpoint directory) of the DeepSpeed checkpoint at ``path``."""
    checkpoint = find_deepspeed_checkpoint(path, trust)
    if checkpoint is None:
        if (path / "best" / CLASSIFIER_FILE).is_file():
            raise UserError(f"{path} is a fine-tuning run; pass its best/ directory ({path / 'best'})")
        raise UserError(
            f"{path} is neither a finished bertds run (no {WEIGHTS_FILE}) nor a DeepSpeed checkpoint "
            f"(no '{LATEST}' file, no *model_states.pt); pass a run's --output-dir or its checkpoints/"
        )
    # bertds writes config.json and tokenizer.json into each tag directory; a run directory holds them too.
    metadata = next(
        (d for d in (checkpoint, checkpoint.parent, checkpoint.parent.parent) if (d / CONFIG_FILE).is_file()), None
    )
    if metadata is None:
        raise UserError(
            f"no {CONFIG_FILE} beside the DeepSpeed checkpoint {checkpoint}; copy the run's "
            f"{CONFIG_FILE} and tokenizer.json into it"
        )
    config, vocab = BertConfig.load(metadata / CONFIG_FILE), Vocab.load(metadata)
    model = BertForPreTraining(config)
    model.load_state_dict(consolidated_state_dict(checkpoint, trust))
    return model.eval(), vocab, checkpoint


def load_checkpoint(path: str | Path, trust: bool = False) -> tuple[BertForPreTraining, Vocab]:
    """(model in eval mode on the CPU, vocabulary) from a finished run or a DeepSpeed checkpoint (see module doc).
    Files that only full unpickling can read (which can run code) are refused unless ``trust``."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"checkpoint {path} does not exist; pass a finished run's --output-dir or a DeepSpeed checkpoint directory"
        )
    if (path / CLASSIFIER_FILE).is_file():
        raise UserError(
            f"{path} is a fine-tuned classifier, not a pretrained BERT; load it with "
            "bertds.tasks.load_classifier (python -m bertds.export turns it into a "
            "BertForSequenceClassification)"
        )
    if (path / WEIGHTS_FILE).is_file():
        return load_pretrained(path)
    model, vocab, _ = load_deepspeed_checkpoint(path, trust)
    return model, vocab


def load_any(path: str | Path, trust: bool = False) -> tuple[BertForPreTraining, Vocab]:
    """(model in eval mode on the CPU, vocabulary) of a Hugging Face BERT directory, or of a finished run or a
    DeepSpeed checkpoint (``load_checkpoint``)."""
    from bertds.hf import is_hf_directory, load_hf_pretrained

    if is_hf_directory(path):
        return load_hf_pretrained(path)
    return load_checkpoint(path, trust)


def export_pretrained(path: Path, out: Path, max_len: int | None, name: str, trust: bool = False) -> str:
    """A pretrained model as a BertForPreTraining directory; returns the transformers class to load it with."""
    from bertds.hf import check_post_layernorm, describe_architecture, save_hf

    if (path / WEIGHTS_FILE).is_file() or not path.is_dir():
        (model, vocab), run_dir, tag = load_checkpoint(path), path, None
    else:
        model, vocab, checkpoint = load_deepspeed_checkpoint(path, trust)
        run_dir, tag = checkpoint.parent.parent, checkpoint.name
    check_post_layernorm(model.config.pre_layernorm, str(path))
    record = read_record(run_dir, RUN_RECORD)
    max_len = max_len or trained_max_len(record)
    if max_len is None:
        max_len = model.config.max_position_embeddings
        print(
            f"note: no {RUN_RECORD} in {run_dir} says which max_len the model was trained at; the tokenizer "
            f"allows all {max_len} positions (pass --max-len to record the trained one)",
            file=sys.stderr,
        )
    if max_len > model.config.max_position_embeddings:
        raise UserError(
            f"--max-len {max_len} exceeds the model's {model.config.max_position_embeddings} positions; "
            "pass the length the model was trained at"
        )
    tokenizer_class = save_hf(model, vocab, out, max_len)
    write_model_card(
        out,
        pretraining_card(describe_architecture(model.config), record, tag, max_len, tokenizer_class, len(vocab), name),
    )
    return "BertForPreTraining"


def export_classifier(path: Path, out: Path, name: str) -> str:
    """A fine-tuned classifier (``best/``) as a BertForSequenceClassification directory."""
    from bertds.hf import describe_architecture, save_hf_classifier

    classifier, vocab, info = load_classifier(path)
    tokenizer_class = save_hf_classifier(classifier, vocab, info["labels"], out, info["max_len"])
    write_model_card(
        out,
        classifier_card(
            describe_architecture(classifier.bert.config),
            info,
            read_record(path.parent, FINETUNE_RECORD),
            tokenizer_class,
            name,
        ),
    )
    return "BertForSequenceClassification"


def push_to_hub(directory: Path, repo_id: str) -> str:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub; install it with pip install -e '.[hf]'") from None
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        return str(
            api.upload_folder(
                repo_id=repo_id, folder_path=str(directory), commit_message="Upload BERT exported by bertds"
            )
        )
    except Exception as e:  # network, authentication and hub errors share no base class
        raise UserError(
            f"could not push {directory} to the hub repository {repo_id} ({type(e).__name__}: "
            f"{str(e)[:200]}); check the network and log in with `hf auth login`"
        ) from None


def export(
    checkpoint: str, out: str, max_len: int | None = None, name: str | None = None, trust: bool = False
) -> tuple[Path, str]:
    """Writes the Hugging Face directory ``out``; returns it and the transformers class that loads it. ``name``:
    what the model card's code loads (a hub repository; default ``out``); ``trust``: see ``load_checkpoint``."""
    path, out_dir = Path(checkpoint), Path(out)
    if out_dir.resolve() == path.resolve() or (out_dir / WEIGHTS_FILE).exists() or (out_dir / LATEST).exists():
        raise UserError(
            f"--out {out_dir} holds a bertds run or checkpoint, which the export would overwrite; "
            "choose another --out directory"
        )
    if (path / CLASSIFIER_FILE).is_file():
        return out_dir, export_classifier(path, out_dir, name or out)
    return out_dir, export_pretrained(path, out_dir, max_len, name or out, trust)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="finished run directory, DeepSpeed checkpoint, or a fine-tuning run's best/"
    )
    parser.add_argument("--out", required=True, help="Hugging Face directory to write")
    parser.add_argument(
        "--max-len",
        type=int,
        help="the tokenizer's model_max_length; default: the length the run trained at (its train_config.json)",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="also upload the directory to this Hugging Face hub repository (huggingface_hub, logged in)",
    )
    parser.add_argument(
        safe_load.TRUST_FLAG,
        action="store_true",
        help="load DeepSpeed files that need full unpickling, which can run code they carry: only "
        "for checkpoints from a source you trust",
    )
    args = parser.parse_args(argv)

    def run() -> None:
        out, model_class = export(args.checkpoint, args.out, args.max_len, args.push_to_hub, args.trust_checkpoint)
        pushed = push_to_hub(out, args.push_to_hub) if args.push_to_hub else None
        print(
            f"exported {args.checkpoint} to {out}: transformers.{model_class}.from_pretrained('{out}'), "
            f"transformers.AutoTokenizer.from_pretrained('{out}')" + (f"; pushed: {pushed}" if pushed else "")
        )

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
