"""Quantization kinds, missing extras, and real bitsandbytes models staying lossless on CPU."""

from __future__ import annotations

import logging
import importlib.util

import pytest
import torch

import specdec
from conftest import hf_greedy, tiny_model, tiny_model_folder
from specdec.errors import MissingExtraError, SpecdecError
from specdec.quantization import (
    KINDS,
    available_kinds,
    build_quantization_config,
    embedding_bits,
    missing_extra,
    weight_bits,
)


def test_bits_per_kind():
    assert weight_bits("fp32") == 32 and weight_bits("bf16") == weight_bits("fp16") == 16
    assert 4 < weight_bits("nf4") < weight_bits("gptq") < 5 < weight_bits("int8") < 9
    assert weight_bits("gguf", dtype_bits=16) == 16  # de-quantized on load
    assert embedding_bits("nf4", 16) == 16 and embedding_bits("fp32") == 32
    with pytest.raises(SpecdecError, match="unknown quantization"):
        weight_bits("int3")


def test_float_and_gguf_kinds_need_nothing():
    for kind in ("fp32", "bf16", "fp16"):
        assert missing_extra(kind) is None and build_quantization_config(kind).config is None
    assert {"fp32", "bf16", "fp16"} <= available_kinds() <= set(KINDS)


@pytest.fixture
def without(monkeypatch):
    """Pretend that some packages are not installed."""
    hidden: set[str] = set()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    return hidden


def test_missing_bitsandbytes_names_the_extra(without):
    without.add("bitsandbytes")
    error = missing_extra("nf4")
    assert isinstance(error, MissingExtraError) and error.extra == "bnb" and "specdec[bnb]" in str(error)
    with pytest.raises(MissingExtraError, match=r"specdec\[bnb\]"):
        build_quantization_config("int8")
    assert "nf4" not in available_kinds()


def test_missing_bitsandbytes_falls_back_and_says_so(without):
    without.add("bitsandbytes")
    choice = build_quantization_config("nf4", torch.float16, fallback=True)
    assert (choice.kind, choice.requested, choice.config) == ("fp16", "nf4", None)
    assert "Fell back to loading unquantized (fp16)" in choice.note and "specdec[bnb]" in choice.note


def test_missing_gptq_backend(without):
    without.update({"optimum", "gptqmodel"})
    choice = build_quantization_config("gptq", fallback=True)
    assert choice.kind == "bf16" and "specdec[gptq]" in choice.note and "GPTQ checkpoint" in choice.note
    with pytest.raises(MissingExtraError) as e:
        build_quantization_config("gptq")
    assert e.value.extra == "gptq" and e.value.package in ("optimum", "gptqmodel")


# ---------------------------------------------------------------------- real bitsandbytes on CPU
def _bnb_model(arch: str, seed: int) -> torch.nn.Module:
    """A tiny random fp32 model on the CPU whose matrices bitsandbytes' 4-bit CPU kernels accept (64-wide blocks),
    its lm_head scaled for peaked distributions (random models are near uniform)."""
    return tiny_model(arch, seed, sharpness=4.0, max_positions=256, hidden=64, intermediate=128, device="cpu")


def _quantized(model: torch.nn.Module, kind: str, folder) -> torch.nn.Module:
    """``model`` saved and re-loaded through bitsandbytes (``kind``), fp32 compute."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    choice = build_quantization_config(kind, torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=choice.config, dtype=torch.float32)
    quantized.generation_config.eos_token_id = None
    quantized.generation_config.pad_token_id = None
    return quantized.eval()


def _prompt(vocab: int = 96) -> list[int]:
    g = torch.Generator().manual_seed(3)
    p = torch.randint(0, vocab, (12,), generator=g).tolist()
    return p + p[:6]


def test_nf4_draft_with_fp32_target_is_greedy_identical_to_the_target(tmp_path):
    pytest.importorskip("bitsandbytes")
    target = _bnb_model("llama", seed=0)
    draft = _quantized(target, "nf4", tmp_path / "draft")
    assert type(draft.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    prompt = _prompt()
    reference = hf_greedy(target, prompt, 16)
    for k in (None, 3):  # adaptive and fixed draft lengths
        result = specdec.SpeculativeGenerator(target, method="draft", draft=draft, num_speculative_tokens=k).generate(
            prompt, max_new_tokens=16
        )
        assert result.token_ids == reference
        assert result.stats.accepted > 0  # the quantized copy agrees often: the draft really ran


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_target_with_speculation_is_identical_to_its_own_greedy(tmp_path, kind):
    pytest.importorskip("bitsandbytes")
    full = _bnb_model("qwen2", seed=1)
    target = _quantized(full, kind, tmp_path / "target")
    prompt = _prompt()
    reference = hf_greedy(target, prompt, 16)  # the quantized target's own greedy decoding
    for method, draft in (("draft", full), ("prompt_lookup", None)):
        result = specdec.SpeculativeGenerator(target, method=method, draft=draft, num_speculative_tokens=4).generate(
            prompt, max_new_tokens=16
        )
        assert result.token_ids == reference, method


def test_int8_says_its_float16_cast_once_not_per_product(tmp_path, caplog):
    """bitsandbytes logs the cast on every int8 product whose input is not float16: thousands of lines."""
    pytest.importorskip("bitsandbytes")
    target = _quantized(_bnb_model("llama", seed=0), "int8", tmp_path / "target")
    with caplog.at_level(logging.WARNING):
        specdec.SpeculativeGenerator(target, method="prompt_lookup").generate(_prompt(), max_new_tokens=8)
    casts = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(casts) <= 1


def test_load_with_a_profile_quantizes_the_target_and_keeps_explicit_choices(tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = str(tiny_model_folder(tmp_path / "tiny", _bnb_model("llama", 0)))
    gen = specdec.load(
        folder, method="prompt_lookup", device="cpu", profile="gpu-4gb", num_speculative_tokens=3, dtype="float32"
    )
    config = gen.selection
    assert (config.profile, config.target_quantization, config.draft_ref) == ("gpu-4gb", "nf4", None)
    # given explicitly, the profile does not override them; float32 so that greedy output is exact (in bfloat16 a
    # verify forward over several rows rounds differently from one row: on CPUs without avx512_bf16 this tiny
    # model's copy was then accepted where plain decoding picks another token)
    assert gen.method == "prompt_lookup" and gen.target.dtype == torch.float32
    assert type(gen.target.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    gen.target.generation_config.eos_token_id = None
    prompt = _prompt()
    assert gen.generate(prompt, max_new_tokens=12).token_ids == hf_greedy(gen.target, prompt, 12)
