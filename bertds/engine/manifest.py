"""A checkpoint's manifest: every file of every rank with its size and SHA-256, written after all of them and
before ``latest`` moves; and the check that a checkpoint directory still holds exactly those bytes and that each of
its torch files can be read without running code.

The checking work is split: every rank looks at every file's presence and size (a ``stat``), and hashes and scans
its own share of the files (``share = (rank, world_size)``), so a checkpoint is read about once in all.
"""

from __future__ import annotations

import json
from pathlib import Path

from bertds import safe_load
from bertds.fsutil import file_sha256, write_atomically

MANIFEST = "manifest.json"
FORMAT = 1


def describe(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def checkpoint_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative, sorted), the manifest itself excepted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def shared(names: list[str], share: tuple[int, int]) -> list[str]:
    rank, world_size = share
    return names[rank::world_size]


def describe_share(directory: Path, share: tuple[int, int]) -> dict[str, dict]:
    return {name: describe(directory / name) for name in shared(checkpoint_files(directory), share)}


def write(directory: Path, files: dict[str, dict], **record) -> None:
    """Writes ``manifest.json`` (atomically: a reader sees no manifest or a whole one)."""
    write_atomically(
        directory / MANIFEST,
        json.dumps({"format": FORMAT, **record, "files": dict(sorted(files.items()))}, indent=1) + "\n",
    )


def read(directory: Path) -> dict | str:
    """The manifest's record, or why there is none to trust."""
    path = directory / MANIFEST
    if not path.is_file():
        return f"it has no {MANIFEST} (its save did not finish)"
    try:
        record = json.loads(path.read_bytes())
        files = record["files"]
        if not all(isinstance(e, dict) and {"size", "sha256"} <= set(e) for e in files.values()):
            raise ValueError(f"an entry without size and sha256 in {MANIFEST}")
        return record
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its {MANIFEST} is unreadable ({str(e)[:120]})"


def damage(directory: Path, share: tuple[int, int] = (0, 1), required: bool = True) -> str | None:
    """What is missing or corrupt in ``directory`` compared with its manifest (None: nothing). ``required=False``
    accepts a directory without a manifest (a checkpoint DeepSpeed wrote without bertds)."""
    record = read(directory)
    if isinstance(record, str):
        return record if required or (directory / MANIFEST).exists() else None
    files = record["files"]
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing (its {MANIFEST} lists it)"
        if path.stat().st_size != entry["size"]:
            return (
                f"{name} is truncated or overwritten ({path.stat().st_size} bytes, its {MANIFEST} says {entry['size']})"
            )
    for name in shared(sorted(files), share):
        if describe(directory / name)["sha256"] != files[name]["sha256"]:
            return f"{name} is corrupt (its SHA-256 differs from the one in {MANIFEST})"
    return None


def unsafe(directory: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why one of the torch files of this share cannot be read without running code (None: all can)."""
    torch_files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*.pt"))
    for name in shared(torch_files, share):
        reason = safe_load.problem(directory / name)
        if reason:
            return reason
    return None
