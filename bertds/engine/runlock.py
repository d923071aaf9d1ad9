"""One run per output directory: an exclusive lock file that names its holder.

The lock is a ``flock`` on ``OUTPUT/.bertds.lock``, so the kernel releases it when the holder dies however it dies;
the file also records the holder (pid, host, start time, command) for the refusal message, and a record left by a
holder that did not release it cleanly is reported as stale when the next run takes the lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from bertds.errors import UserError

LOCK_FILE = ".bertds.lock"


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}: {holder.get('command', '?')}"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """``with RunLock(output_dir):`` holds the directory for the duration; a second holder gets a UserError naming
    the first. Creates the directory (a regular file or a read-only place in its way is a UserError)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.fd: int | None = None
        self.stale: dict | None = None  # the record of a previous holder that died holding the lock
        self.created = False  # the directory did not exist: removed on release if nothing was written

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise UserError(f"--output-dir {self.output_dir} is a file, not a directory; choose another --output-dir")
        self.created = not self.output_dir.exists()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"--output-dir {self.output_dir} cannot be written ({e.strerror}); choose a writable --output-dir"
            ) from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(
                    f"--output-dir {self.output_dir} is in use by another run ({_describe(holder)}); "
                    "wait for it to end or choose another --output-dir"
                ) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: take the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.stale = _read_holder(fd) or None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        os.unlink(self.path)  # before unlocking: a newcomer then locks a fresh file (see acquire's inode check)
        os.close(self.fd)
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                self.output_dir.rmdir()

    def stale_message(self) -> str | None:
        if not self.stale:
            return None
        return f"note: {self.path} was left by a run that ended without releasing it ({_describe(self.stale)})"
