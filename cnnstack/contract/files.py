"""Atomic file writes: a reader sees the old file or the new one, never part of one.

The data goes to a new file beside the target (same directory, so same filesystem), is flushed
and fsynced, then renamed over the target in one ``os.replace``. The new file gets the mode any
file created by ``open`` gets (0o666 under the umask): other users, such as a server image that
runs as another uid, read it as they would any other.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], object]


def atomic_write(path: str | os.PathLike[str], write: Writer) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_text(obj: Any, *, sort_keys: bool = True) -> str:
    """How every JSON file of the stack is written: indented, one trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file nobody reads yet (inside a directory that is renamed into place later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
