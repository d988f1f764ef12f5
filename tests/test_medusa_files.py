"""train-medusa files: written whole or not at all, and a damaged one is a clear error on --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_model
from specdec.errors import SpecdecError
from specdec.files import atomic_path, write_atomic
from specdec.medusa.train import CHECKPOINT_DIR, TrainConfig, train
from test_medusa import SMALL_RUN, ByteTokenizer, _corpus


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "train_state.pt"
    write_atomic(path, b"previous checkpoint")
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save
    assert path.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["train_state.pt"], "no temporary file is left behind"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new checkpoint")
    assert path.read_bytes() == b"new checkpoint"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run with a checkpoint, its target and its corpus."""
    tmp = tmp_path_factory.mktemp("medusa-files")
    target = tiny_model("qwen2", vocab=256, sharpness=4.0)
    data = _corpus(tmp)
    train(target, ByteTokenizer(), data, tmp / "out", TrainConfig(steps=6, checkpoint_every=3, **SMALL_RUN))
    return target, data, tmp / "out"


def _resume(trained, out: Path) -> None:
    target, data, _ = trained
    train(target, ByteTokenizer(), data, out, TrainConfig(steps=8, checkpoint_every=0, **SMALL_RUN), resume=True)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage,match",
    [
        ("checkpoint/train_state.pt", "training state .*train_state.pt is unreadable"),
        ("checkpoint/medusa_config.json", "unreadable Medusa config .*medusa_config.json"),
        ("checkpoint/medusa_heads.safetensors", "unreadable Medusa weights .*medusa_heads.safetensors"),
        ("cache/meta.json", "meta.json is unreadable"),
        ("cache/features.safetensors", "features.safetensors is unreadable"),
    ],
)
def test_a_damaged_file_is_a_clear_error_on_resume(trained, tmp_path, damage, match):
    out = _copy(trained[2], tmp_path / "out")
    file = out / damage
    assert file.is_file()
    with open(file, "r+b") as f:  # cut in half, as an interrupted in-place write would leave it
        f.truncate(file.stat().st_size // 2)
    with pytest.raises(SpecdecError, match=match) as e:
        _resume(trained, out)
    assert e.value.hint


def test_a_checkpoint_without_its_step_is_a_clear_error(trained, tmp_path):
    import torch

    out = _copy(trained[2], tmp_path / "out")
    torch.save({"optimizer": {}}, out / CHECKPOINT_DIR / "train_state.pt")
    with pytest.raises(SpecdecError, match="lacks its step"):
        _resume(trained, out)


def test_resume_after_a_sound_checkpoint_still_works(trained, tmp_path):
    out = _copy(trained[2], tmp_path / "out")
    _resume(trained, out)
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps_run"] == 2
