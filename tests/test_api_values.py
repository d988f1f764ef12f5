"""API values are checked when a call is made (``stream()`` included, before its first ``next()``),
with an error naming the argument; Medusa files are checked before their heads are allocated."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import specdec
from conftest import tiny_model
from specdec.errors import InvalidSamplingError, SpecdecError
from specdec.medusa import MedusaHeads

VOCAB = 96


@pytest.fixture(scope="module")
def gen():
    return specdec.SpeculativeGenerator(tiny_model("llama", seed=0, vocab=VOCAB), method="prompt_lookup")


BAD_VALUES = [
    (dict(max_new_tokens=5.0), "max_new_tokens"),
    (dict(max_new_tokens=math.nan), "max_new_tokens"),
    (dict(max_new_tokens=math.inf), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=5.0), "top_k"),
    (dict(top_k=math.nan), "top_k"),
    (dict(top_k=math.inf), "top_k"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="0.7"), "temperature"),
    (dict(top_p=math.nan), "top_p"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(suppress_tokens=[-1]), "suppress_tokens"),
    (dict(suppress_tokens=[VOCAB]), "suppress_tokens"),
    (dict(suppress_tokens=[2.5]), "suppress_tokens"),
    (dict(suppress_tokens=7), "suppress_tokens"),
    (dict(stop=5), "stop"),
    (dict(stop=["ok", None]), "stop"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=1.5), "seed"),
]


@pytest.mark.parametrize("kwargs,name", BAD_VALUES)
def test_bad_values_are_refused_by_generate(gen, kwargs, name):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InvalidSamplingError, match=name):
        gen.generate([1, 2, 3], **kwargs)


@pytest.mark.parametrize("kwargs,name", BAD_VALUES)
def test_bad_values_are_refused_by_stream_before_next(gen, kwargs, name):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InvalidSamplingError, match=name):
        gen.stream([1, 2, 3], **kwargs)  # the call itself raises; no next() needed


@pytest.mark.parametrize("prompt,worst", [([1, VOCAB, 2], VOCAB), ([5, -1], -1), ([10**9], 10**9)])
def test_prompt_ids_outside_the_vocabulary(gen, prompt, worst):
    with pytest.raises(
        InvalidSamplingError, match=f"the prompt has token id {worst}, outside the target's vocabulary of {VOCAB}"
    ):
        gen.stream(prompt, max_new_tokens=4)


def test_good_values_still_work(gen):
    ref = gen.generate([1, 2, 3], max_new_tokens=6)
    out = gen.generate([1, 2, 3], max_new_tokens=np.int64(6), top_k=np.int64(0), suppress_tokens={VOCAB - 1})
    assert len(ref.token_ids) == 6
    assert VOCAB - 1 not in out.token_ids
    if VOCAB - 1 not in ref.token_ids:
        assert out.token_ids == ref.token_ids
    events = list(gen.stream([1, 2, 3], max_new_tokens=6))
    assert [t for e in events for t in e.token_ids] == ref.token_ids


# ---------------------------------------------------------------------- Medusa files
@pytest.fixture
def medusa_folder(tmp_path):
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    heads = MedusaHeads.init(target, num_heads=2, token_subset=torch.arange(0, VOCAB, 2))
    heads.save(tmp_path / "h")
    MedusaHeads.from_pretrained(tmp_path / "h", target)  # sound as saved
    return target, tmp_path / "h"


def test_token_subset_out_of_range_in_a_file(medusa_folder):
    target, folder = medusa_folder
    state = load_file(folder / "medusa_heads.safetensors")
    state["token_subset"][-1] = VOCAB + 7
    save_file(state, str(folder / "medusa_heads.safetensors"))
    with pytest.raises(SpecdecError, match=r"token_subset has ids outside \[0, 96\)"):
        MedusaHeads.from_pretrained(folder, target)


def test_config_of_another_size_is_refused_before_allocating(medusa_folder):
    target, folder = medusa_folder
    config = json.loads((folder / "medusa_config.json").read_text())
    # heads of this size would need 2 x [10^6, 10^5] floats (800 GB) if they were allocated first
    config.update(hidden_size=100_000, vocab_size=1_000_000, subset_size=0, own_lm_head=True)
    (folder / "medusa_config.json").write_text(json.dumps(config))
    with pytest.raises(SpecdecError, match="hidden size 100000, vocabulary 1000000"):
        MedusaHeads.from_pretrained(folder, target)


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_config", "list_config"])
def test_damaged_medusa_files(medusa_folder, damage):
    target, folder = medusa_folder
    weights, config = folder / "medusa_heads.safetensors", folder / "medusa_config.json"
    if damage == "truncate_weights":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        match = "unreadable Medusa weights"
    elif damage == "garbage_config":
        config.write_bytes(b"\x00\xff{")
        match = "unreadable Medusa config"
    else:
        config.write_text("[1, 2]")
        match = "unreadable Medusa config"
    with pytest.raises(SpecdecError, match=match):
        MedusaHeads.from_pretrained(folder, target)


@pytest.mark.parametrize("k", ["abc", "3", 3.0, True, -1, math.nan])
def test_num_speculative_tokens_takes_integers_only(k):
    with pytest.raises(SpecdecError, match=r"num_speculative_tokens must be an integer >= 0, got " + repr(k)[:3]):
        specdec.SpeculativeGenerator(
            tiny_model("llama", seed=0, vocab=VOCAB), method="prompt_lookup", num_speculative_tokens=k
        )
