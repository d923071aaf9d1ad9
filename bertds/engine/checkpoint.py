"""Training checkpoints: DeepSpeed's engine state plus what exact resume needs (step, data position, RNG streams,
per-rank log accumulators), the vocabulary and the model config; and finding the checkpoint to resume or export.

Layout: ``OUTPUT/checkpoints/step00000010/`` (DeepSpeed's files, ``bertds_rank00000.pt`` per rank,
``tokenizer.json``, ``config.json``, ``run.json`` and ``manifest.json``, written last) and ``OUTPUT/checkpoints/latest``
naming the newest complete one. ``latest`` is replaced atomically only after every rank has finished writing and
the manifest lists every file, so an interrupted save never becomes ``latest``; a save that fails (a full disk)
removes its partial directory on every rank and leaves ``latest`` as it was. bertds' own per-rank state holds only
tensors and numbers, so it loads with the weights-only unpickler.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from bertds import safe_load
from bertds.data.tokenizer import Vocab
from bertds.engine import manifest
from bertds.errors import UserError
from bertds.fsutil import write_atomically
from bertds.model import BertConfig

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step(\d{8})$")
MODEL_STATES = "*model_states.pt"  # DeepSpeed's module files: mp_rank_00_... or, under ZeRO-3, zero_pp_rank_*_...
FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
MB = 1e6


def rank_file(rank: int) -> str:
    return f"bertds_rank{rank:05d}.pt"


def capture_rng() -> dict:
    """Every RNG stream as tensors and numbers (numpy's Mersenne Twister keys become an int64 tensor)."""
    kind, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state())  # the legacy tuple, the default
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if get_accelerator().device_name() != "cpu":
        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def batch_layout(engine) -> dict:
    """What a resumed run must share with the saved one for the data position to mean the same examples."""
    return {
        "world_size": dist.get_world_size(),
        "train_batch_size": engine.train_batch_size(),
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
    }


# --- finding checkpoints ---------------------------------------------------------------------------------------


@dataclass
class Found:
    """The checkpoints at a path: ``candidates`` in the order to try them (the one ``latest`` names, then the
    others newest first); ``explicit``: the path named one checkpoint, so there is nothing to fall back to."""

    root: Path
    candidates: list[Path]
    explicit: bool
    latest_problem: str | None  # why ``latest`` names no checkpoint, if it exists and does not


def is_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and (
        (directory / manifest.MANIFEST).is_file()
        or (directory / rank_file(0)).is_file()
        or any(directory.glob(MODEL_STATES))
    )


def _step(directory: Path) -> int:
    digits = re.search(r"(\d+)$", directory.name)
    return int(digits.group(1)) if digits else -1


def _read_latest(root: Path) -> tuple[str | None, str | None]:
    """(the tag ``latest`` names, None) or (None, why it names none); (None, None) without a ``latest``."""
    path = root / LATEST
    if not path.is_file():
        return None, None
    raw = path.read_bytes()
    try:
        tag = raw.decode().strip()
    except UnicodeDecodeError:
        return None, f"{path} holds no checkpoint name ({raw[:16]!r}...)"
    if not tag or Path(tag).name != tag or not is_checkpoint(root / tag):
        return None, f"{path} names '{tag[:80]}', which is not a checkpoint directory in {root}"
    return tag, None


def locate(path: Path) -> Found | None:
    """The checkpoints at ``path``: one checkpoint directory, a directory of them (``OUTPUT/checkpoints``, with or
    without a ``latest`` file) or a run directory holding one; None if there are none."""
    path = Path(path)
    if is_checkpoint(path):
        return Found(path.parent, [path], explicit=True, latest_problem=None)
    for root in (path, path / CHECKPOINTS):
        if not root.is_dir():
            continue
        tags = sorted((d for d in root.iterdir() if is_checkpoint(d)), key=_step, reverse=True)
        latest, problem = _read_latest(root)
        if tags or problem:
            first = [root / latest] if latest else []
            return Found(root, first + [t for t in tags if t.name != latest], explicit=False, latest_problem=problem)
    return None


def _share() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def agreed(problem: str | None) -> str | None:
    """Collective when a process group exists: the first rank's problem, the same on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    return next((p for p in everyone if p), None)


def verify(checkpoint: Path, trust: bool = False, require_manifest: bool = True) -> str | None:
    """What keeps ``checkpoint`` from being loaded (a missing, truncated or corrupt file, or one that only full
    unpickling can read, unless ``trust``); None if nothing. Collective when a process group exists: each rank
    checks its share of the files and all agree on the verdict."""
    share = _share()
    try:
        problem = manifest.damage(checkpoint, share, required=require_manifest)
        problem = problem or (None if trust else manifest.unsafe(checkpoint, share))
    except OSError as e:
        problem = f"it cannot be read ({e})"
    return agreed(problem)


def first_verified(found: Found, trust: bool = False, require_manifest: bool = True) -> tuple[Path, list[str]]:
    """(the first candidate that verifies, why the ones before it were passed over); a UserError if none does,
    naming what is wrong and the complete checkpoints the user can pass instead. Collective like ``verify``."""
    passed_over = [found.latest_problem] if found.latest_problem else []
    for candidate in found.candidates:
        problem = verify(candidate, trust, require_manifest)
        if problem is None:
            return candidate, passed_over
        passed_over.append(f"{candidate} is damaged: {problem}")
        if found.explicit:
            others = [c for c in (locate(found.root) or found).candidates if c != candidate]
            complete = [str(c) for c in others if verify(c, trust, require_manifest) is None]
            hint = (
                f"complete checkpoints: {', '.join(complete)}"
                if complete
                else f"there is no other complete checkpoint in {found.root}"
            )
            raise UserError(f"checkpoint {candidate} cannot be used: {problem}; {hint}")
    raise UserError(
        f"no complete checkpoint in {found.root}: {'; '.join(passed_over)}; restore the damaged files, "
        "or start a new run"
    )


def warn(message: str) -> None:
    if _share()[0] == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def verified(found: Found, trust: bool = False, require_manifest: bool = True, use: str = "using") -> Path:
    """The checkpoint of ``found`` to load (``first_verified``); the damaged ones passed over are said in a warning
    ("...; ``use`` CHECKPOINT, the newest checkpoint that verifies"). Collective like ``verify``."""
    checkpoint, passed_over = first_verified(found, trust, require_manifest)
    if passed_over:
        warn(f"{'; '.join(passed_over)}; {use} {checkpoint}, the newest checkpoint that verifies")
    return checkpoint


def find_checkpoint(
    output_dir: Path, resume: str | None, max_len: int | None = None, trust: bool = False
) -> Path | None:
    """The checkpoint directory to resume from, verified against its manifest on every rank: ``auto`` -> the one
    ``latest`` names in output_dir, else the newest that verifies (saying why; None if there is none yet); a path ->
    that checkpoint directory, or the latest one of a directory of them. Collective: every rank must call it right
    after the process group starts, before any other collective, so that all ranks stop together on a bad one."""
    if resume is None:
        return None
    found = locate(Path(output_dir) if resume == "auto" else Path(resume))
    if found is None:
        if resume == "auto":
            return None
        raise UserError(
            f"--resume {resume} is not a bertds checkpoint (no {manifest.MANIFEST}, {rank_file(0)} or "
            f"'{LATEST}' file); pass --resume auto or a directory under OUTPUT/checkpoints/"
        )
    try:
        checkpoint = verified(found, trust, use="resuming from")
    except UserError as e:
        if resume != "auto" or (found.root / LATEST).exists():
            raise
        warn(f"{e}; no checkpoint was ever completed ('{LATEST}' is missing), so training starts from step 0")
        return None
    check_max_len(checkpoint, max_len)
    return checkpoint


# --- what a checkpoint must match ------------------------------------------------------------------------------


def check_max_len(checkpoint: Path, max_len: int | None) -> None:
    saved = (
        json.loads((checkpoint / RUN_FILE).read_text()).get("max_len") if (checkpoint / RUN_FILE).is_file() else None
    )
    if max_len is not None and saved is not None and saved != max_len:
        raise UserError(
            f"checkpoint {checkpoint} was written with --max-len {saved} (now {max_len}); resume with "
            f"--max-len {saved}, or train at {max_len} in a new --output-dir"
        )


def check_compatible(checkpoint: Path, model_config: BertConfig, vocab: Vocab) -> None:
    """Raises a UserError unless the checkpoint was written for this model config and vocabulary."""
    if Vocab.load(checkpoint).fingerprint() != vocab.fingerprint():
        raise UserError(
            f"checkpoint {checkpoint} was written with a different vocabulary than the data of this "
            "run; resume with the same corpus and tokenizer or use a new --output-dir"
        )
    saved = BertConfig.load(checkpoint / "config.json")
    differences = {
        k: (v, getattr(model_config, k)) for k, v in saved.to_dict().items() if getattr(model_config, k) != v
    }
    if differences:
        described = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in differences.items())
        raise UserError(
            f"checkpoint {checkpoint} was written for another model config ({described}); "
            "resume with the same --model/--dropout flags or use a new --output-dir"
        )


def check_batch_layout(checkpoint: Path, engine) -> None:
    """Raises a UserError unless rank count and batch sizes match the checkpoint's (the data position counts
    micro-batches of one rank's shard)."""
    saved = json.loads((checkpoint / RUN_FILE).read_text())
    now = batch_layout(engine)
    differences = [f"{k} {saved[k]} (now {v})" for k, v in now.items() if saved[k] != v]
    if differences:
        raise UserError(
            f"checkpoint {checkpoint} was written with {', '.join(differences)}; resume with the same "
            "number of ranks and batch sizes, or start a new run with --init-from"
        )


# --- saving and loading ----------------------------------------------------------------------------------------


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def _attempt(action) -> OSError | RuntimeError | None:
    try:
        action()
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its zip writer
        return e
    return None


def _save_failure(error: Exception, directory: Path) -> str:
    """The error line of a failed save, the same whichever rank tells it."""
    root = directory.parent
    latest, _ = _read_latest(root)
    kept = f"{root / LATEST} still names {latest}" if latest else f"there is no earlier checkpoint in {root}"
    free = shutil.disk_usage(root).free
    if getattr(error, "errno", None) == errno.ENOSPC or free < FULL_DISK_BYTES:
        previous = manifest.read(root / latest) if latest else None
        needed = (
            f"about {sum(e['size'] for e in previous['files'].values()) / MB:.1f} MB (the size of {latest})"
            if isinstance(previous, dict)
            else f"more than the {_size(directory) / MB:.1f} MB it had written"
        )
        return (
            f"no space left on device while saving checkpoint {directory}: it needs {needed}, "
            f"{free / MB:.1f} MB are free on {root}; the partial checkpoint was removed and {kept}; free space "
            "or move --output-dir, then rerun with --resume auto"
        )
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return f"could not write checkpoint {directory} ({detail}); the partial checkpoint was removed and {kept}"


def _give_up(failure: str, directory: Path) -> UserError:
    dist.barrier()  # every rank has stopped writing
    if dist.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    dist.barrier()
    return UserError(failure)


def _write_rank_files(
    directory: Path, step: int, rank_state: dict, vocab: Vocab, model_config: BertConfig, run_record: dict
) -> None:
    torch.save({**rank_state, "rng": capture_rng()}, directory / rank_file(dist.get_rank()))
    if dist.get_rank() == 0:
        vocab.save(directory)
        model_config.save(directory / "config.json")
        (directory / RUN_FILE).write_text(json.dumps({"step": step, **run_record}, indent=2) + "\n")


def _commit(root: Path, directory: Path, files: dict[str, dict], step: int, keep_last: int) -> None:
    """Rank 0: the manifest, then ``latest`` (atomically), then pruning."""
    manifest.write(directory, files, tag=directory.name, step=step, world_size=dist.get_world_size())
    write_atomically(root / LATEST, directory.name)
    _prune(root, keep_last, keep=directory.name)


def save_training_checkpoint(
    engine,
    output_dir: Path,
    step: int,
    client_state: dict,
    rank_state: dict,
    vocab: Vocab,
    model_config: BertConfig,
    keep_last: int,
    max_len: int | None = None,
) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory. ``rank_state``: tensors and numbers
    only. A failed write (a full disk) on any rank is a UserError on every rank, after the partial directory is
    removed."""
    root = Path(output_dir) / CHECKPOINTS
    directory = root / f"step{step:08d}"
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if rank == 0 and directory.exists():  # an uncommitted or damaged save of this step, from before a resume
        shutil.rmtree(directory)
    error = _attempt(
        lambda: engine.save_checkpoint(str(root), tag=directory.name, client_state=client_state, save_latest=False)
    )
    if error is not None:
        dist.barrier()  # the peers wait in the barrier that ends engine.save_checkpoint
    run_record = {**batch_layout(engine), "max_len": max_len}
    error = error or _attempt(lambda: _write_rank_files(directory, step, rank_state, vocab, model_config, run_record))
    failure = agreed(_save_failure(error, directory) if error else None)
    if failure:
        raise _give_up(failure, directory)
    files: list[dict] = [{}] * world_size
    dist.all_gather_object(files, manifest.describe_share(directory, (rank, world_size)))
    error = (
        _attempt(lambda: _commit(root, directory, {k: v for f in files for k, v in f.items()}, step, keep_last))
        if rank == 0
        else None
    )
    failure = agreed(_save_failure(error, directory) if error else None)
    if failure:
        raise _give_up(failure, directory)
    return directory


def _prune(root: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag != keep:
            shutil.rmtree(root / tag, ignore_errors=True)


def load_training_checkpoint(engine, checkpoint: Path, trust: bool = False) -> tuple[dict, dict]:
    """Loads engine state (module, optimizer, scheduler, loss scaler) and this rank's state; restores the RNG
    streams. Returns (client_state, rank_state). DeepSpeed unpickles its files fully: ``find_checkpoint`` has
    checked that they need nothing beyond tensors and DeepSpeed's data classes (unless ``trust``)."""
    path, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if path is None:
        raise UserError(
            f"DeepSpeed could not load checkpoint {checkpoint}; it is incomplete or from another engine configuration"
        )
    rank_state = safe_load.load(checkpoint / rank_file(dist.get_rank()), trust=trust)
    restore_rng(rank_state["rng"])
    return client_state, rank_state
