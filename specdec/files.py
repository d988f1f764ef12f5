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

from .errors import SpecdecError


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


def check_writable(path: str | Path, option: str, folder: bool = False) -> None:
    """Raise :class:`SpecdecError` now when ``path`` (given as ``option``; a file, or a ``folder``) could not be
    written later: a file that is a folder, or the nearest existing folder at or above it is a file or not
    writable. For the output of a long run, which should fail before the run, not after it."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise SpecdecError(f"{option} {path} is a folder", f"give a file name for {option}")
    above = next(p for p in ((path,) if folder else ()) + (path.parent, *path.parent.parents) if p.exists())
    if not above.is_dir():
        raise SpecdecError(f"{option} {path} cannot be written: {above} is a file", f"choose another path for {option}")
    if not os.access(above, os.W_OK):
        raise SpecdecError(
            f"{option} {path} cannot be written: {above} is not writable", f"choose another path for {option}"
        )
