"""Files written so that a reader sees the old content or the whole new one, never a part of it, and hashed so that
a damaged copy is found."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` (this process' own), then renames it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in blocks (hashlib.file_digest is Python 3.11+)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
