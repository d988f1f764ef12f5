"""Unpacked copies of .gguf models: a load from the copy gives the very model and tokenizer the .gguf load gave.

Real parts: the packaged smollm2-135m file, copied into a temporary model cache, loaded by transformers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from specdec import SpeculativeGenerator, models, unpacked
from specdec.cli import main
from specdec.loading import load_model

NAME = "smollm2-135m"
TEXT = "def f(x):\n    return  x + 1  # é 中文 <|im_end|> <|im_start|>user"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A temporary model cache (``$SPECDEC_MODELS``) holding a copy of the pulled smollm2-135m file."""
    source = Path(os.path.expanduser("~/.cache/specdec/models")) / models.packaged(NAME).file
    if not source.is_file():
        pytest.skip("smollm2-135m is not pulled: run `specdec-local models pull smollm2-135m`")
    folder = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECDEC_MODELS", str(folder))
        yield Path(shutil.copy2(source, folder / source.name))


WARNINGS: dict[str, list[str]] = {}
"""What each load of the ``both`` fixture logged at WARNING (shown by the CLI), by load."""


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _load_logged(path: Path, name: str):
    handler = _Lines(WARNINGS.setdefault(name, []))
    logger = logging.getLogger("specdec.loading")
    logger.addHandler(handler)
    try:
        return load_model(str(path), dtype="float32", device="cpu")
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def both(cache):
    """``(from the .gguf file, from its unpacked copy, the copy)``: each a ``(model, tokenizer)``."""
    assert unpacked.copies() == []
    first = _load_logged(cache, "first")
    where = unpacked.copy_for(cache, torch.float32)
    assert unpacked.copies() == [where.folder]
    second = _load_logged(cache, "second")
    return first, second, where


def test_the_second_load_reads_the_copy(both):
    (gguf_model, _), (copy_model, _), where = both
    # both are named by the file the user gave (trained Medusa heads record it), not by the internal copy
    assert gguf_model.name_or_path == copy_model.name_or_path == str(where.source)
    assert json.loads((where.folder / unpacked.RECORD).read_text()) == where.record
    # the slow first load says why it is slow (the CLI shows warnings; it would be a minute of silence)
    assert len(WARNINGS["first"]) == 1 and "de-quantized" in WARNINGS["first"][0]
    assert "unpacked copy" in WARNINGS["first"][0] and WARNINGS["second"] == []  # the second read the copy


def test_the_copy_is_the_same_model_bit_for_bit(both):
    (gguf_model, _), (copy_model, _), _ = both
    a, b = gguf_model.state_dict(), copy_model.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    assert gguf_model.generation_config.to_dict() == copy_model.generation_config.to_dict()
    assert gguf_model.config.tie_word_embeddings == copy_model.config.tie_word_embeddings
    assert copy_model.lm_head.weight.data_ptr() == copy_model.model.embed_tokens.weight.data_ptr()


def test_the_copy_has_the_same_tokenizer(both):
    (_, gguf_tok), (_, copy_tok), _ = both
    assert gguf_tok.encode(TEXT) == copy_tok.encode(TEXT)
    assert gguf_tok.decode(gguf_tok.encode(TEXT)) == copy_tok.decode(copy_tok.encode(TEXT))
    assert gguf_tok.all_special_tokens == copy_tok.all_special_tokens
    chat = [{"role": "user", "content": "Write a haiku about rivers."}]
    assert gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        copy_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )


def test_both_generate_the_same_text(both):
    (gguf_model, tokenizer), (copy_model, _), _ = both
    prompt = tokenizer("Rename x to count in: def f(x): return x + 1")["input_ids"]
    outputs = [
        SpeculativeGenerator(model, tokenizer, method="prompt_lookup").generate(prompt, max_new_tokens=24).token_ids
        for model in (gguf_model, copy_model)
    ]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 24


def test_a_changed_file_gets_a_new_copy_and_the_old_one_goes(both, cache):
    (model, tokenizer), _, old = both
    stat = cache.stat()
    os.utime(cache, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        new = unpacked.copy_for(cache, torch.float32)
        assert new.folder != old.folder and not new.complete
        assert unpacked.store(model, tokenizer, new)
        assert unpacked.copies() == [new.folder]
        other_dtype = unpacked.copy_for(cache, torch.bfloat16)
        assert other_dtype.folder != new.folder and not other_dtype.complete
    finally:
        os.utime(cache, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert unpacked.store(model, tokenizer, old)  # back to the fixture's state
    assert unpacked.copies() == [old.folder]


def test_a_generation_config_its_own_check_refuses_is_still_kept(both, cache, caplog):
    """In the webui every GenerationConfig gets a min_p of 0.0 (its sampler hijack), which transformers' strict
    check refuses when not sampling: the copy is still written (the draft used to fail to load, every reply)."""
    (model, tokenizer), _, current = both
    other = unpacked.copy_for(cache, torch.bfloat16)  # another folder: the fixture's copy stays as it is
    before, model.generation_config.min_p = model.generation_config.min_p, 0.0
    try:
        assert unpacked.store(model, tokenizer, other) and other.complete
    finally:
        model.generation_config.min_p = before
        shutil.rmtree(other.folder, ignore_errors=True)
    assert unpacked.copies() == [current.folder]


def test_a_copy_that_cannot_be_written_is_logged_not_raised(both, cache, monkeypatch, caplog):
    (model, tokenizer), _, current = both
    other = unpacked.copy_for(cache, torch.bfloat16)

    def refuse(*args, **kwargs):
        raise ValueError("a reason of the library's own")

    monkeypatch.setattr(unpacked, "_write", refuse)
    assert unpacked.store(model, tokenizer, other) is False
    assert "not keeping an unpacked copy" in caplog.text and "ValueError" in caplog.text
    assert unpacked.copies() == [current.folder]


def test_copies_of_other_transformers_versions_but_the_last_used_one_stay(both, cache, monkeypatch):
    """Two environments with different transformers versions (the webui's pinned one and the CLI's) each keep their
    copy instead of removing the other's at every load; of older versions only the one used last stays."""
    import transformers

    (model, tokenizer), _, current = both
    made = {}
    for version in ("4.0.0", "4.1.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        made[version] = unpacked.copy_for(cache, torch.float32)
        assert unpacked.store(model, tokenizer, made[version])
        assert current.folder in unpacked.copies()  # the other environment's copy stays
        if version == "4.0.0":
            os.utime(made[version].folder / unpacked.RECORD, (0, 0))  # last used long ago...
            assert unpacked.load(current) is not None  # ...and the current version's copy just now
    monkeypatch.undo()
    assert unpacked.copies() == sorted([current.folder, made["4.1.0"].folder])  # 4.0.0's went
    shutil.rmtree(made["4.1.0"].folder)
    assert unpacked.copies() == [current.folder]  # back to the fixture's state


def test_a_damaged_copy_is_removed_and_not_used(both, caplog):
    (model, tokenizer), _, where = both
    weights = where.folder / unpacked.WEIGHTS
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert unpacked.load(where) is None
    assert not where.folder.exists() and "unreadable unpacked copy" in caplog.text
    assert unpacked.store(model, tokenizer, where) and unpacked.load(where) is not None


def test_no_copy_when_the_disk_would_be_left_too_full(both, cache, monkeypatch, caplog):
    (model, tokenizer), _, _ = both
    monkeypatch.setattr(unpacked, "FREE_MARGIN_BYTES", shutil.disk_usage(cache.parent).free)
    where = unpacked.copy_for(cache, torch.float16)
    caplog.set_level("INFO", logger="specdec.unpacked")
    assert not unpacked.store(model, tokenizer, where)
    assert not where.folder.exists() and "not keeping an unpacked copy" in caplog.text
    assert not [p for p in unpacked.root().iterdir() if p.name.startswith(".")]  # nothing half-written


def test_models_list_shows_the_copies_and_clean_removes_them(both):
    runner = CliRunner()
    listed = runner.invoke(main, ["models", "list"])
    assert listed.exit_code == 0 and "unpacked copies of .gguf files (for fast loading): 1," in listed.output
    cleaned = runner.invoke(main, ["models", "clean"])
    assert cleaned.exit_code == 0 and "removed 1 unpacked copy" in cleaned.output
    assert unpacked.copies() == [] and not unpacked.root().exists()
    assert "unpacked copies" not in runner.invoke(main, ["models", "list"]).output
    assert "removed 0 unpacked copies, 0 MB freed" in runner.invoke(main, ["models", "clean"]).output
