"""The final model directory: weights, model config and vocabulary, loadable back with ``load_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

from bertds import safe_load
from bertds.data.tokenizer import Vocab
from bertds.errors import UserError
from bertds.fsutil import file_sha256, write_atomically
from bertds.model import BertConfig, BertForPreTraining

WEIGHTS_FILE = "model.pt"
# sha256sum's format ("HASH  model.pt"): torch does not check its zip's checksums, so a flipped byte would load.
WEIGHTS_CHECKSUM_FILE = "model.pt.sha256"
CONFIG_FILE = "config.json"


def save_pretrained(
    state_dict: dict[str, torch.Tensor], config: BertConfig, vocab: Vocab, directory: str | Path
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().float().cpu() for k, v in state_dict.items()}, directory / WEIGHTS_FILE)
    write_atomically(directory / WEIGHTS_CHECKSUM_FILE, f"{file_sha256(directory / WEIGHTS_FILE)}  {WEIGHTS_FILE}\n")
    config.save(directory / CONFIG_FILE)
    vocab.save(directory)


def load_pretrained(directory: str | Path, device: torch.device | str = "cpu") -> tuple[BertForPreTraining, Vocab]:
    """(model in eval mode, vocabulary) from a directory written by ``save_pretrained``."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory / name} is missing; pass the --output-dir of a finished bertds run")
    config = BertConfig.load(directory / CONFIG_FILE)
    vocab = Vocab.load(directory)
    if len(vocab) != config.vocab_size:
        raise UserError(
            f"{directory}: vocabulary has {len(vocab)} tokens but the model expects "
            f"{config.vocab_size}; the tokenizer.json belongs to another run"
        )
    model = BertForPreTraining(config)
    weights = load_weights(directory)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # the weights of another module
        raise UserError(
            f"{directory / WEIGHTS_FILE} holds no bertds BertForPreTraining weights for its "
            f"{CONFIG_FILE} ({str(e).splitlines()[0][:160]}); pass a finished bertds pretraining run"
        ) from None
    return model.to(device).eval(), vocab


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """``model.pt``'s state dict (empty when it holds no dict), read weights-only, after checking the file against
    ``model.pt.sha256`` when the run wrote one."""
    checksum = directory / WEIGHTS_CHECKSUM_FILE
    if checksum.is_file() and checksum.read_text().split()[:1] != [file_sha256(directory / WEIGHTS_FILE)]:
        raise UserError(
            f"{directory / WEIGHTS_FILE} does not match its SHA-256 in {WEIGHTS_CHECKSUM_FILE} (corrupt or "
            "replaced); copy the run again or use one of its checkpoints"
        )
    weights = safe_load.load(directory / WEIGHTS_FILE)
    return weights if isinstance(weights, dict) else {}
