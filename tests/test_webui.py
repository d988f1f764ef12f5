"""The webui extension's request logic (specdec/webui.py), without the webui.

Inputs are shaped as text-generation-webui makes them: its generation
``state`` (:func:`test_plugin.state`), the two call signatures of
``custom_generate_reply``, its stop-string text box; models and tokenizers
are tiny real ones built in-process.
"""

from __future__ import annotations

from collections import UserDict
from typing import Any

import pytest
import torch

from specdec.engine import SpeculativeGenerator
from specdec.errors import (
    MissingDraftError,
    MissingHeadsError,
    ModelNotFoundError,
    SpecdecError,
    StaticCacheMemoryError,
    UnsupportedModelError,
    VocabularyMismatchError,
)
from specdec.webui import (
    STATIC_CACHE_LABEL,
    Request,
    cut_at_stop,
    drop_rows,
    generation_config_problems,
    is_greedy,
    new_tokens_limit,
    panel_hint,
    parse_call,
    sampler_order,
    sampling_arguments,
    stop_strings,
    token_bans,
    unsupported_settings,
    visible_prompt,
    webui_eos_ids,
)
from conftest import tiny_model
from test_plugin import PROMPT, _model, _tokenizer, state


def _request(stopping_strings: Any = None, **overrides: Any) -> Request:
    return parse_call(PROMPT, PROMPT, (state(**overrides), stopping_strings), {"is_chat": True})


# --------------------------------------------------------------------------- the call
def test_the_current_call_signature() -> None:
    s = state()
    positional = parse_call("q", "o", (s, ["x"]), {"is_chat": True})
    keywords = parse_call("q", "o", (), {"state": s, "stopping_strings": ["x"], "is_chat": True})
    for call in (positional, keywords):
        assert (call.question, call.original_question, call.state) == ("q", "o", s)
        assert (call.stopping_strings, call.is_chat, call.seed, call.old_signature) == (["x"], True, None, False)
    bare = parse_call("q", "o", (s,), {})
    assert (bare.stopping_strings, bare.is_chat) == (None, False)


def test_the_older_call_signature_with_a_seed() -> None:
    call = parse_call("q", "o", (7, state(seed=-1), ["x"]), {"is_chat": True})
    assert (call.seed, call.stopping_strings, call.is_chat, call.old_signature) == (7, ["x"], True, True)
    keyword_seed = parse_call("q", "o", (state(),), {"seed": "11"})
    assert (keyword_seed.seed, keyword_seed.old_signature) == (11, True)


def test_a_call_without_a_state_dict_is_refused() -> None:
    with pytest.raises(KeyError):
        parse_call("q", "o", (), {})
    with pytest.raises(TypeError):  # a mapping that is not a dict is taken for an old-style seed
        parse_call("q", "o", (UserDict(state()), ["x"]), {})


def test_the_seed_of_the_call_wins_over_the_states() -> None:
    assert parse_call("q", "o", (5, state(seed=9)), {}).webui_seed == 5
    assert parse_call("q", "o", (state(seed=9),), {}).webui_seed == 9
    assert parse_call("q", "o", ({"max_new_tokens": 4},), {}).webui_seed == -1


# --------------------------------------------------------------------------- stop strings
def test_stop_strings_from_the_call_and_the_states_text_box() -> None:
    # the webui's text box holds comma-separated quoted strings, with escapes
    box = '"\\nUser:", "###", "\\nUser:"'
    assert stop_strings(_request(["</s>", "###"], custom_stopping_strings=box)) == ["</s>", "###", "\nUser:"]
    assert stop_strings(_request(None, custom_stopping_strings=["a", "", 3, "b"])) == ["a", "b"]
    assert stop_strings(_request(("x",), custom_stopping_strings="   ")) == ["x"]


def test_a_stop_text_that_is_not_quoted_is_one_string() -> None:
    assert stop_strings(_request(None, custom_stopping_strings="User: hi, there")) == ["User: hi, there"]
    assert stop_strings(_request(None, custom_stopping_strings="'unterminated")) == ["'unterminated"]


def test_cut_at_the_earliest_stop_string() -> None:
    assert cut_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert cut_at_stop("one two", ["four"]) == ("one two", False)
    assert cut_at_stop("one two", []) == ("one two", False)


# --------------------------------------------------------------------------- sampling
def test_greedy_states() -> None:
    assert is_greedy(state()) and is_greedy(state(do_sample=True, temperature=0))
    assert is_greedy(state(do_sample=False, temperature=0.7))
    assert not is_greedy(state(do_sample=True, temperature=0.7))


def test_sampling_arguments_of_greedy_and_sampling_states() -> None:
    greedy = sampling_arguments(state(do_sample=False, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2))
    assert greedy == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.2}
    sampled = sampling_arguments(state(do_sample=True, temperature=0.7, top_k=40, top_p=0.9))
    assert sampled == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.0}
    blank = sampling_arguments(state(do_sample=True, temperature=1, top_k=None, top_p=None, repetition_penalty=None))
    assert blank == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


def test_new_tokens_limit() -> None:
    assert new_tokens_limit(state(max_new_tokens=24), 100) == 24
    assert new_tokens_limit(state(max_new_tokens=24, auto_max_new_tokens=True, truncation_length=256), 100) == 156
    assert new_tokens_limit({}, 10) == 512


@pytest.mark.parametrize(
    ("settings", "ok"),
    [
        ({}, True),
        ({"sampler_priority": ["top_p", "temperature", "top_k"]}, False),
        ({"sampler_priority": "top_k\ntemperature\ntop_p"}, True),  # temperature and top-k commute
        ({"temperature_last": True}, False),  # temperature after top-p
        ({"temperature_last": True, "top_p": 1.0}, True),
        ({"sampler_priority": ["temperature", "top_k"]}, False),  # unlisted top_p sorts first
        (
            {"repetition_penalty": 1.2, "sampler_priority": ["top_k", "repetition_penalty", "temperature", "top_p"]},
            False,
        ),
    ],
)
def test_sampler_order_follows_the_webuis_priority(settings: dict[str, Any], ok: bool) -> None:
    sampling = state(**{"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9, **settings})
    problems = [p for p in unsupported_settings(sampling, 100) if "sampler_priority" in p]
    assert (problems == []) is ok, problems


def test_sampler_order_lists_only_active_samplers() -> None:
    assert sampler_order(state()) == []
    assert sampler_order(state(repetition_penalty=1.1)) == ["repetition_penalty"]
    sampling = state(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, temperature_last=True)
    assert sampler_order(sampling) == ["top_k", "top_p", "temperature"]


# --------------------------------------------------------------------------- what specdec cannot reproduce
def test_unsupported_settings_of_a_greedy_state() -> None:
    assert unsupported_settings(state(), 100) == []
    assert unsupported_settings(state(presence_penalty=0.5, negative_prompt="bad"), 100) == [
        "presence_penalty=0.5",
        "negative_prompt='bad'",
    ]
    assert unsupported_settings(state(grammar_string=None), 100) == []  # None is neutral
    assert unsupported_settings(state(logits_processor=[object()]), 100) == [
        "logits processors (logit_bias or logprobs of the request, or another extension's)"
    ]
    # the webui's prompt lookup runs transformers' assisted generation, whose output can differ from plain decoding
    assert unsupported_settings(state(prompt_lookup_num_tokens=3), 100) == ["prompt_lookup_num_tokens=3"]
    assert unsupported_settings(state(prompt_lookup_num_tokens=0), 100) == []
    # samplers that only act when sampling do not matter for greedy decoding
    assert unsupported_settings(state(min_p=0.1), 100) == []
    assert unsupported_settings(state(min_p=0.1, do_sample=True, temperature=0.7), 100) == ["min_p=0.1"]


def test_a_repetition_penalty_range_shorter_than_the_context() -> None:
    assert unsupported_settings(state(repetition_penalty=1.2, repetition_penalty_range=64), 100) == [
        "repetition_penalty_range=64 (shorter than the context)"
    ]
    assert unsupported_settings(state(repetition_penalty=1.2, repetition_penalty_range=128), 100) == []
    assert unsupported_settings(state(repetition_penalty=1.2, repetition_penalty_range=0), 100) == []
    assert unsupported_settings(state(repetition_penalty=1, repetition_penalty_range=64), 100) == []


def test_generation_config_processors() -> None:
    model = _model(len(_tokenizer()), 0)
    assert generation_config_problems(model) == []
    model.generation_config.min_new_tokens = 5
    model.generation_config.renormalize_logits = True
    assert generation_config_problems(model) == [
        "the model's generation_config.min_new_tokens=5",
        "the model's generation_config.renormalize_logits=True",
    ]


def _first_logits(model: Any, ids: list[int], eos: list[int], **kwargs: Any) -> torch.Tensor:
    """Scores of the first token of ``generate`` called with ``eos`` (and ``kwargs``)."""
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=1,
        do_sample=False,
        eos_token_id=eos,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )
    return out.logits[0][0]


@pytest.mark.parametrize("case", ["pad_in_prompt", "pad_is_eos", "no_pad"])
def test_the_visible_prompt_is_what_transformers_reads(case: str) -> None:
    """Which prompt tokens transformers masks when the webui calls ``generate``, and that the prompt without
    them gives the very scores: checked against ``generate`` itself."""
    tokenizer = _tokenizer()
    a = tokenizer.encode("a")[0]
    special = {
        "pad_in_prompt": {"pad": a, "eos": 257},
        "pad_is_eos": {"pad": a, "eos": a},
        "no_pad": {"pad": None, "eos": a},
    }[case]
    model = _model(len(tokenizer), 0, bos=1, **special)  # BOS 1: LlamaConfig's default
    if case == "no_pad":
        model.generation_config.pad_token_id = None
    ids = [tokenizer.bos_token_id] + tokenizer.encode(PROMPT)
    eos = [a] if case != "pad_in_prompt" else [257]
    visible = visible_prompt(ids, model, eos)
    inferred = _first_logits(model, ids, eos)
    unmasked = _first_logits(model, ids, eos, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    if case == "pad_in_prompt":
        assert visible == [t for t in ids if t != a] and len(visible) < len(ids)
        assert not torch.allclose(inferred, unmasked), "transformers masked the pad tokens"
        alone = _first_logits(model, visible, eos, attention_mask=torch.ones(1, len(visible), dtype=torch.long))
        torch.testing.assert_close(inferred, alone, rtol=1e-5, atol=1e-5)  # as if they were not there
        assert visible_prompt([*ids, a], model, eos) is None  # masked last: its own row gives the first token
    else:
        assert visible == ids
        assert torch.equal(inferred, unmasked)


# --------------------------------------------------------------------------- what generate is given
def test_the_webui_stops_at_the_tokenizers_eos_alone() -> None:
    tokenizer = _tokenizer()
    assert webui_eos_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("</s>")]
    tokenizer.eos_token = None
    assert webui_eos_ids(tokenizer) == []


def test_token_bans_replace_the_models_suppress_tokens() -> None:
    tokenizer = _tokenizer()
    eos = tokenizer.eos_token_id
    model = _model(len(tokenizer), 0)
    model.generation_config.suppress_tokens = [3]
    assert token_bans(state(), tokenizer, model) == [3]
    assert token_bans(state(), tokenizer) == []
    assert token_bans(state(ban_eos_token=True), tokenizer, model) == [eos]
    assert token_bans(state(ban_eos_token=True, custom_token_bans="5, 7"), tokenizer, model) == [eos, 5, 7]
    assert token_bans(state(custom_token_bans="12,"), tokenizer, model) == [12]


# --------------------------------------------------------------------------- errors
def test_errors_a_webui_reply_can_meet_name_the_panels_controls(tmp_path) -> None:
    """The library's hints name CLI flags (``--no-static-cache``, ``--method``), which a webui user cannot
    pass; the errors a reply in the webui can meet, raised here by the library itself, get the panel's."""
    from specdec import static
    from specdec.loading import load_model
    from specdec.proposers.lookahead import check_model
    from specdec.vocab import check_vocabularies

    errors: dict[type, SpecdecError] = {}
    flash = tiny_model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    for kind, fail in (
        (StaticCacheMemoryError, lambda: static.StaticKV(tiny_model("llama")).start(2**40)),
        (VocabularyMismatchError, lambda: check_vocabularies(tiny_model(vocab=96), tiny_model(vocab=4096), None, None)),
        (UnsupportedModelError, lambda: check_model(flash)),
        (ModelNotFoundError, lambda: load_model(str(tmp_path / "gone-draft"))),
        (MissingDraftError, lambda: SpeculativeGenerator(tiny_model("llama"), method="draft")),
        (MissingHeadsError, lambda: SpeculativeGenerator(tiny_model("llama"), method="medusa")),
    ):
        with pytest.raises(kind) as info:
            fail()
        errors[kind] = info.value
    for kind, error in errors.items():
        hint = panel_hint(error)
        assert hint and hint != error.hint and "--" not in hint, (kind, hint)
    assert STATIC_CACHE_LABEL in panel_hint(errors[StaticCacheMemoryError])
    assert "*Draft model*" in panel_hint(errors[VocabularyMismatchError])
    assert panel_hint(SpecdecError("another error", "its own hint")) == "its own hint"


def test_drop_rows_renumbers_the_metadata_of_the_rows_that_stay() -> None:
    rows = [[f"user {i}", f"reply {i}"] for i in range(4)]
    history = {
        "internal": rows,
        "visible": [list(r) for r in rows],
        "metadata": {"user_0": {"a": 0}, "assistant_1": {"b": 1}, "user_3": {"c": 3}, "other": 7},
    }
    cut = drop_rows(history, 2)
    assert cut["internal"] == rows[2:] and cut["visible"] == rows[2:]
    assert cut["metadata"] == {"user_1": {"c": 3}, "other": 7}
    assert history["internal"] == rows and "user_0" in history["metadata"], "the webui's own history is unchanged"
    assert drop_rows(history, 0)["metadata"] == history["metadata"]
