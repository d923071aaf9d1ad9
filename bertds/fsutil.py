"""Replacing a file so that a reader sees its old content or the whole new one, never a part of it."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` (this process' own), then renames it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
