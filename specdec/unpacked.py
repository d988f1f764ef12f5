"""Unpacked copies of ``.gguf`` models, so that only the first load of a file pays for reading it.

transformers reads a ``.gguf`` file three times per load (config, tokenizer, weights), each time parsing all of
its metadata, the tokenizer's vocabulary and merges included, in Python, and then de-quantizes every tensor. On
this project's 2-core CPU that is 16 s for the 98 MB default model and 38 s for the 0.5B draft, every time a
process starts. After the first load of a file in a dtype, the loaded model's weights (safetensors), its config,
generation config and tokenizer are written to a folder under ``$SPECDEC_MODELS/unpacked``; a later load of the
same file (same path, size and modification time) in the same dtype, under the same transformers version, reads
that folder instead, in about a second. The tensors are the ones the ``.gguf`` load produced, so the model is the
same bit for bit (``tests/test_unpacked.py``). Two environments with different transformers versions (the webui's
pinned one and the CLI's) keep a copy each; a copy of a file that changed, and all but the last used copy of other
versions, are removed when a new copy is written.

A copy takes the model's size in that dtype (2 bytes per parameter in bfloat16, 4 in float32). It is not written
when the disk would keep less than :data:`FREE_MARGIN_BYTES` free, and ``specdec-local models clean`` removes
them all; either way loading still works, only slower.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import models
from .files import unique_sibling

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when what a copy holds changes, so that older copies are not read."""
RECORD = "source.json"
"""Written last: a folder without it is not a copy (an interrupted write leaves none, see :func:`store`)."""
WEIGHTS = "model.safetensors"
FREE_MARGIN_BYTES = 2 << 30
"""Free disk space a copy must leave behind, or it is not written."""
KEEP_OTHER_VERSIONS = 1
"""Copies of a file in a dtype kept for transformers versions other than the one writing a new copy."""


@dataclass(frozen=True)
class Copy:
    """Where the unpacked copy of one ``.gguf`` file in one dtype lives, and what it is made from."""

    folder: Path
    record: dict[str, Any]
    """What :data:`RECORD` holds: the source file's path, size and modification time, the dtype, versions."""

    @property
    def source(self) -> Path:
        return Path(self.record["source"])

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.record["dtype"])

    @property
    def complete(self) -> bool:
        return (self.folder / RECORD).is_file()


def root() -> Path:
    """The folder holding every unpacked copy: ``$SPECDEC_MODELS/unpacked``."""
    return models.cache_dir() / "unpacked"


def copy_for(gguf: str | Path, dtype: torch.dtype) -> Copy:
    """The unpacked copy of ``gguf`` loaded in ``dtype`` (whether it exists or not).

    The folder's name carries a digest of the file's path, size and modification time, the dtype, the
    transformers version and :data:`FORMAT`, so a changed file or another version never reads a stale copy.
    """
    import transformers

    source = Path(gguf).resolve()
    stat = source.stat()
    record = {
        "format": FORMAT,
        "source": str(source),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return Copy(root() / f"{source.stem}.{record['dtype']}.{digest}", record)


def load(where: Copy) -> tuple[torch.nn.Module, Any] | None:
    """``(model, tokenizer)`` from the copy, on the CPU; None when there is none or it cannot be read.

    A copy that cannot be read (truncated by a full disk, edited) is removed, with one log line, and the
    caller loads the ``.gguf`` file again.
    """
    if not where.complete:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where.folder)
        model = AutoModelForCausalLM.from_pretrained(where.folder, dtype=where.dtype)
    except Exception as e:  # a damaged copy fails deep in a reader; the .gguf file is still there
        if not where.complete:  # removed while it was read (`models clean` in another process): not damaged
            log.info("the unpacked copy %s was removed while it was read; reading the .gguf file", where.folder)
            return None
        log.warning("removing the unreadable unpacked copy %s (%s: %s)", where.folder, type(e).__name__, e)
        shutil.rmtree(where.folder, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):  # when it was last used: the copy of another version kept longest
        os.utime(where.folder / RECORD)
    return model, tokenizer


def storable(model: torch.nn.Module) -> bool:
    """Whether the model holds plain floating-point tensors (not GGUF blocks kept packed, not bitsandbytes)."""
    return all(t.is_floating_point() for t in model.state_dict().values())


def size_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors, each storage counted once (tied embeddings share one)."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def store(model: torch.nn.Module, tokenizer: Any, where: Copy) -> bool:
    """Write the unpacked copy of a model just loaded from ``where.source``; True when written.

    Never raises for a reason of its own (a full or read-only disk, a model it cannot hold): it logs one line and
    the load goes on without a copy. The files are written into a hidden folder that is renamed into place only
    when whole, so an interrupted write (Ctrl-C, a crash) leaves no copy behind.
    """
    if not storable(model):
        return False
    need = size_bytes(model)
    try:
        where.folder.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(where.folder.parent).free
    except OSError as e:
        log.warning("not keeping an unpacked copy of %s: %s", where.source.name, e)
        return False
    if free < need + FREE_MARGIN_BYTES:
        log.info(
            "not keeping an unpacked copy of %s: it needs %d MiB and %d MiB are free; later loads will read "
            "the .gguf file again",
            where.source.name,
            need >> 20,
            free >> 20,
        )
        return False
    tmp = unique_sibling(where.folder)
    try:
        _write(model, tokenizer, where, tmp)
        os.rename(tmp, where.folder)
    except Exception as e:  # noqa: BLE001 - a full disk, another process first, a config its library refuses
        if not where.complete:
            log.warning("not keeping an unpacked copy of %s: %s: %s", where.source.name, type(e).__name__, e)
        return where.complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "kept an unpacked copy of %s (%d MiB) in %s: later loads read it", where.source.name, need >> 20, where.folder
    )
    _remove_outdated(where)
    return True


def _write(model: torch.nn.Module, tokenizer: Any, where: Copy, folder: Path) -> None:
    """The copy's files: config (without the GGUF quantization entry), generation config, weights, tokenizer."""
    from safetensors.torch import save_model

    folder.mkdir()
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    try:
        model.generation_config.save_pretrained(folder)
    except ValueError:  # its strict check: the webui's sampler hijack gives every GenerationConfig a min_p of
        # 0.0, refused when not sampling; written as save_pretrained writes it (the differences from the defaults)
        model.generation_config.to_json_file(folder / "generation_config.json", use_diff=True)
    save_model(model, str(folder / WEIGHTS))
    tokenizer.save_pretrained(folder)
    (folder / RECORD).write_text(json.dumps(where.record, indent=1) + "\n")


def _remove_outdated(current: Copy) -> None:
    """Remove the copies of the same file in the same dtype that no load can read any more (made from an older
    version of the file, or in an older :data:`FORMAT`), and those made under other transformers versions but the
    one used last: two environments with different versions (the webui's own and the CLI's) each keep theirs,
    and an upgraded one leaves one copy behind, not one per upgrade."""
    same_file: list[tuple[float, Path]] = []
    for other in copies():
        record = _read_record(other)
        if other == current.folder or record.get("source") != str(current.source):
            continue
        if record.get("dtype") != current.record["dtype"]:
            continue
        if any(record.get(key) != current.record[key] for key in ("size", "mtime_ns", "format")):
            shutil.rmtree(other, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                same_file.append(((other / RECORD).stat().st_mtime, other))
    for _, other in sorted(same_file, reverse=True)[KEEP_OTHER_VERSIONS:]:
        shutil.rmtree(other, ignore_errors=True)


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def copies() -> list[Path]:
    """Every complete copy, by name."""
    if not root().is_dir():
        return []
    return sorted(p for p in root().iterdir() if (p / RECORD).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def clean() -> tuple[int, int]:
    """Remove every unpacked copy (and any left half-written); return ``(copies removed, bytes freed)``."""
    if not root().is_dir():
        return 0, 0
    found = copies()
    freed = sum(folder_bytes(p) for p in root().iterdir() if p.is_dir())
    shutil.rmtree(root())
    return len(found), freed
