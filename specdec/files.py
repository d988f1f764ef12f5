"""Writing files whole or not at all: a unique temporary file beside the target, then ``os.replace``.

A reader (another process, a resumed run) sees either the old file or the
new one, never a half-written one, whatever interrupts the writer (Ctrl-C, a
full disk, a crash).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def unique_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden name beside ``path`` that no other process or thread uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends without error it replaces ``path``.

    On an error (or ``KeyboardInterrupt``) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = unique_sibling(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
