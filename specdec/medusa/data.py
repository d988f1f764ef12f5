"""Training text for Medusa heads: a text file, a JSONL file or a folder of files.

JSONL lines may carry ``text``, ``content``, ``prompt``/``response`` or chat
``messages``; any other file is read as UTF-8 text. Python's own standard
library (:func:`stdlib_path`) is an offline corpus for code models.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from ..errors import SpecdecError

TEXT_SUFFIXES = (
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".js",
    ".ts",
    ".java",
    ".go",
    ".rs",
    ".sh",
    ".json",
    ".jsonl",
    ".toml",
    ".yaml",
    ".yml",
    ".html",
    ".css",
    ".cpp",
    ".hpp",
)
MAX_FILE_BYTES = 2_000_000
# folders never searched: installed third-party packages, caches, VCS and hidden folders
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules"})


def stdlib_path() -> Path:
    """The folder of Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _jsonl_texts(path: Path) -> list[str]:
    texts: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecdecError(
                f"{path}:{lineno} is not valid JSON ({e.msg})", "give one JSON object per line"
            ) from None
        if isinstance(item, str):
            texts.append(item)
            continue
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item.get("content"), str):
            texts.append(item["content"])
        elif isinstance(item.get("messages"), list):
            texts.append("\n".join(str(m.get("content", "")) for m in item["messages"] if isinstance(m, dict)))
        elif isinstance(item.get("prompt"), str):
            texts.append(item["prompt"] + "\n" + str(item.get("response", item.get("completion", ""))))
    return texts


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    data = path.read_bytes()[:MAX_FILE_BYTES]
    if b"\x00" in data[:4096]:
        return []  # binary
    return [data.decode("utf-8", errors="replace")]


def _skipped(relative: Path) -> bool:
    return any(part in SKIP_DIRS or part.startswith(".") for part in relative.parts[:-1])


def read_corpus(path: str | Path, max_chars: int | None = None) -> list[str]:
    """The documents under ``path`` (file or folder, sorted), non-empty ones only.

    Args:
        path: a text file, a ``.jsonl`` file or a folder (searched recursively
            for files with a text suffix, see :data:`TEXT_SUFFIXES`, skipping
            :data:`SKIP_DIRS` and hidden folders).
        max_chars: stop after roughly this many characters (None = all).
    Raises:
        SpecdecError: the path is missing or unreadable, or holds no text.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise SpecdecError(f"training data not found: {root}", "give a text file, a .jsonl file or a folder of files")
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.suffix in TEXT_SUFFIXES and not _skipped(p.relative_to(root)) and p.is_file()
        )
        if not files:
            raise SpecdecError(
                f"no text files in {root}", f"expected files ending in one of {', '.join(TEXT_SUFFIXES)}"
            )
    else:
        files = [root]
    texts: list[str] = []
    total = 0
    for f in files:
        try:
            found = _file_texts(f)
        except (OSError, UnicodeDecodeError) as e:
            if root.is_dir():
                continue  # skip one unreadable file of a folder
            raise SpecdecError(f"cannot read training data {f}: {e}") from None
        for t in found:
            if t.strip():
                texts.append(t)
                total += len(t)
        if max_chars is not None and total >= max_chars:
            break
    if not texts:
        raise SpecdecError(f"the training data at {root} is empty", "give files with some text in them")
    return texts
