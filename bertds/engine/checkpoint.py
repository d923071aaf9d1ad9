"""Training checkpoints: DeepSpeed's engine state plus what exact resume needs (step, data position, RNG streams,
per-rank log accumulators), the vocabulary and the model config.

Layout: ``OUTPUT/checkpoints/step00000010/`` (DeepSpeed's files, ``bertds_rank00000.pt`` per rank,
``tokenizer.json``, ``config.json``) and ``OUTPUT/checkpoints/latest`` naming the newest complete one. ``latest`` is
replaced atomically only after every rank has finished writing, so an interrupted save never becomes ``latest``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from bertds.data.tokenizer import Vocab
from bertds.errors import UserError
from bertds.model import BertConfig

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step(\d{8})$")
FAULT_ENV = "BERTDS_FAULT_INJECT"  # tests only: "kill_before_latest@STEP" SIGKILLs the process mid-save


def rank_file(rank: int) -> str:
    return f"bertds_rank{rank:05d}.pt"


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if get_accelerator().device_name() != "cpu":
        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def batch_layout(engine) -> dict:
    """What a resumed run must share with the saved one for the data position to mean the same examples."""
    return {"world_size": dist.get_world_size(), "train_batch_size": engine.train_batch_size(),
            "micro_batch": engine.train_micro_batch_size_per_gpu()}


def save_training_checkpoint(engine, output_dir: Path, step: int, client_state: dict, rank_state: dict,
                             vocab: Vocab, model_config: BertConfig, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    root = Path(output_dir) / CHECKPOINTS
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save({**rank_state, "rng": capture_rng()}, root / tag / rank_file(rank))
    if rank == 0:
        vocab.save(root / tag)
        model_config.save(root / tag / "config.json")
        (root / tag / RUN_FILE).write_text(json.dumps({"step": step, **batch_layout(engine)}, indent=2) + "\n")
    dist.barrier()
    if os.environ.get(FAULT_ENV) == f"kill_before_latest@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        tmp = root / f"{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)
        _prune(root, keep_last, keep=tag)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag != keep:
            shutil.rmtree(root / tag, ignore_errors=True)


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint directory to resume from: ``auto`` -> the latest complete one in output_dir (None if there
    is none yet); a path -> that checkpoint directory, or the latest one of a checkpoints directory."""
    if resume is None:
        return None
    if resume == "auto":
        latest = Path(output_dir) / CHECKPOINTS / LATEST
        return latest.parent / latest.read_text().strip() if latest.is_file() else None
    path = Path(resume)
    for candidate in (path, path / CHECKPOINTS):
        if (candidate / LATEST).is_file():
            return candidate / (candidate / LATEST).read_text().strip()
    if (path / rank_file(0)).is_file():
        return path
    raise UserError(f"--resume {resume} is not a bertds checkpoint (no {rank_file(0)} and no '{LATEST}' file); "
                    "pass --resume auto or a directory under OUTPUT/checkpoints/")


def check_compatible(checkpoint: Path, model_config: BertConfig, vocab: Vocab) -> None:
    """Raises a UserError unless the checkpoint was written for this model config and vocabulary."""
    if Vocab.load(checkpoint).fingerprint() != vocab.fingerprint():
        raise UserError(f"checkpoint {checkpoint} was written with a different vocabulary than the data of this "
                        "run; resume with the same corpus and tokenizer or use a new --output-dir")
    saved = BertConfig.load(checkpoint / "config.json")
    differences = {k: (v, getattr(model_config, k)) for k, v in saved.to_dict().items()
                   if getattr(model_config, k) != v}
    if differences:
        described = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in differences.items())
        raise UserError(f"checkpoint {checkpoint} was written for another model config ({described}); "
                        "resume with the same --model/--dropout flags or use a new --output-dir")


def check_batch_layout(checkpoint: Path, engine) -> None:
    """Raises a UserError unless rank count and batch sizes match the checkpoint's (the data position counts
    micro-batches of one rank's shard)."""
    saved = json.loads((checkpoint / RUN_FILE).read_text())
    now = batch_layout(engine)
    differences = [f"{k} {saved[k]} (now {v})" for k, v in now.items() if saved[k] != v]
    if differences:
        raise UserError(f"checkpoint {checkpoint} was written with {', '.join(differences)}; resume with the same "
                        "number of ranks and batch sizes, or start a new run with --init-from")


def load_training_checkpoint(engine, checkpoint: Path) -> tuple[dict, dict]:
    """Loads engine state (module, optimizer, scheduler, loss scaler) and this rank's state; restores the RNG
    streams. Returns (client_state, rank_state)."""
    path, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {checkpoint}; it is incomplete or from another "
                        "engine configuration")
    rank_state = torch.load(checkpoint / rank_file(dist.get_rank()), weights_only=False)
    restore_rng(rank_state["rng"])
    return client_state, rank_state
