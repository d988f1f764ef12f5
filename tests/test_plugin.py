"""The text-generation-webui extension (plugin/specdec/script.py) against stub ``modules.*``.

The webui cannot be pip installed, so the few ``modules`` the adapter imports
are stubbed in ``sys.modules`` the way the webui provides them; the target is
a tiny random Llama and a byte-level tokenizer built in-process.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "plugin" / "specdec" / "script.py"
PROMPT = "<|user|>abcabcabc abc abc<|assistant|>"


# --------------------------------------------------------------------------- tiny model and tokenizer
def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    return fast


def _model(vocab: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=256, eos_token_id=257, pad_token_id=257)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    tokenizer = _tokenizer()
    return _model(len(tokenizer), 0), tokenizer


# --------------------------------------------------------------------------- stub webui
class FakeLlamaServer:
    """Stands for a model that the webui runs without transformers (llama.cpp)."""


class Webui:
    """The stubbed ``modules`` package and what the adapter did with it."""

    def __init__(self, tmp: Path) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.shared = types.ModuleType("modules.shared")
        self.shared.model = None
        self.shared.tokenizer = None
        self.shared.stop_everything = False
        self.shared.is_seq2seq = False
        self.shared.settings = {}
        self.shared.args = types.SimpleNamespace(loader="Transformers", model_dir=str(tmp / "models"))
        self.logging = types.ModuleType("modules.logging_colors")
        self.logging.logger = logging.getLogger("webui-stub")
        self.text_generation = types.ModuleType("modules.text_generation")
        self.text_generation.generate_reply_HF = self._own("HF")
        self.text_generation.generate_reply_custom = self._own("custom")
        self.package = types.ModuleType("modules")
        self.package.shared = self.shared
        self.package.logging_colors = self.logging
        self.package.text_generation = self.text_generation

    def _own(self, name: str):
        def generate(question: str, original_question: str, state: dict, stopping_strings=None, is_chat=False) -> Iterator[str]:
            self.calls.append((name, (question, original_question, state, stopping_strings), {"is_chat": is_chat}))
            yield "webui "
            yield "webui reply"

        return generate


@pytest.fixture
def webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny) -> Webui:
    stub = Webui(tmp_path)
    stub.shared.model, stub.shared.tokenizer = tiny
    for name, module in (("modules", stub.package), ("modules.shared", stub.shared),
                         ("modules.logging_colors", stub.logging), ("modules.text_generation", stub.text_generation)):
        monkeypatch.setitem(sys.modules, name, module)
    return stub


def load_extension(monkeypatch: pytest.MonkeyPatch, name: str = "user_ext_specdec") -> types.ModuleType:
    """script.py imported the way the webui imports a user extension, then ``setup()``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    module.setup()
    return module


@pytest.fixture
def ext(webui: Webui, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    return load_extension(monkeypatch)


def state(**overrides: Any) -> dict[str, Any]:
    """A webui generation state with greedy settings (as the API sends for temperature 0)."""
    s = {
        "max_new_tokens": 24, "auto_max_new_tokens": False, "truncation_length": 256, "temperature": 0,
        "do_sample": False, "top_p": 1, "top_k": 0, "min_p": 0, "typical_p": 1, "repetition_penalty": 1,
        "repetition_penalty_range": 1024, "presence_penalty": 0, "frequency_penalty": 0, "seed": -1,
        "add_bos_token": True, "ban_eos_token": False, "custom_token_bans": "", "skip_special_tokens": True,
        "custom_stopping_strings": "", "stream": True, "grammar_string": "", "negative_prompt": "",
        "guidance_scale": 1, "dry_multiplier": 0, "no_repeat_ngram_size": 0, "stop_event": None,
    }
    s.update(overrides)
    return s


def reference(model: Any, tokenizer: Any, prompt: str = PROMPT, max_new_tokens: int = 24, keep: int | None = None,
              suppress: list[int] | None = None) -> str:
    """What the webui's own greedy generation gives: transformers greedy, stopped at the tokenizer's EOS."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
    if keep is not None:
        ids = ids[-keep:]
    kwargs: dict[str, Any] = {"suppress_tokens": suppress} if suppress else {}
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.eos_token_id, **kwargs)[0, len(ids):]
    new = [int(t) for t in out if int(t) != tokenizer.eos_token_id]
    return tokenizer.decode(new, skip_special_tokens=True)


def reply(ext: types.ModuleType, *args: Any, **kwargs: Any) -> list[str]:
    return list(ext.custom_generate_reply(*args, **kwargs))


# --------------------------------------------------------------------------- tests
def test_cumulative_yields_match_the_webuis_own_greedy_output(ext, webui, tiny) -> None:
    chunks = reply(ext, PROMPT, PROMPT, state(), ["never"], is_chat=True)
    assert chunks, "no reply"
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:])), "yields must be cumulative"
    assert chunks[-1] == reference(*tiny)
    assert len(chunks) > 1, "the reply should stream"
    assert ext.last_reply.method == "prompt_lookup" and ext.last_reply.new_tokens > 0
    assert webui.calls == []


def test_both_call_signatures(ext, tiny) -> None:
    new = reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    old = reply(ext, PROMPT, PROMPT, 1234, state(), None, is_chat=True)
    keywords = reply(ext, PROMPT, PROMPT, state=state(), stopping_strings=None, is_chat=True)
    assert new[-1] == old[-1] == keywords[-1] == reference(*tiny)
    call = ext.parse_call("q", "o", (7, state(seed=-1), ["x"]), {"is_chat": True})
    assert (call.seed, call.stopping_strings, call.is_chat, call.old_signature) == (7, ["x"], True, True)


def test_completions_yield_an_empty_reply_first(ext, tiny) -> None:
    chunks = reply(ext, PROMPT, PROMPT, state(), None, is_chat=False)
    assert chunks[0] == "" and chunks[-1] == reference(*tiny)


@pytest.mark.parametrize("where", ["argument", "state_text", "state_list"])
def test_stopping_strings_cut_the_reply(ext, tiny, where: str) -> None:
    full = reference(*tiny)
    stop = full[5:8]
    expected = full[: full.find(stop)]
    if where == "argument":
        chunks = reply(ext, PROMPT, PROMPT, state(), [stop], is_chat=True)
    elif where == "state_text":
        chunks = reply(ext, PROMPT, PROMPT, state(custom_stopping_strings=f'"zzz", "{stop}"'), None, is_chat=True)
    else:
        chunks = reply(ext, PROMPT, PROMPT, state(custom_stopping_strings=[stop]), None, is_chat=True)
    assert chunks[-1] == expected
    assert all(stop not in c for c in chunks)
    assert ext.last_reply.finish_reason == "stop"


def test_stop_everything_ends_generation_promptly(ext, webui, tiny) -> None:
    gen = ext.custom_generate_reply(PROMPT, PROMPT, state(max_new_tokens=200), None, is_chat=True)
    first = next(gen)
    webui.shared.stop_everything = True
    rest = list(gen)
    assert len(rest) <= 1
    assert ext.last_reply.finish_reason == "stopped"
    assert ext.last_reply.new_tokens < 200
    assert first


def test_stop_event_of_the_api_ends_generation(ext, tiny) -> None:
    event = threading.Event()
    gen = ext.custom_generate_reply(PROMPT, PROMPT, state(max_new_tokens=200, stop_event=event), None, is_chat=True)
    next(gen)
    event.set()
    list(gen)
    assert ext.last_reply.finish_reason == "stopped" and ext.last_reply.new_tokens < 200


def test_fallback_for_a_model_not_run_by_transformers(ext, webui, caplog) -> None:
    webui.shared.model = FakeLlamaServer()
    webui.shared.args.loader = "llama.cpp"
    with caplog.at_level(logging.WARNING, logger="webui-stub"):
        first = reply(ext, PROMPT, PROMPT, state(), ["x"], is_chat=True)
        second = reply(ext, PROMPT, PROMPT, state(), ["x"], is_chat=True)
    assert first == second == ["webui ", "webui reply"]
    assert [c[0] for c in webui.calls] == ["custom", "custom"]
    assert webui.calls[0][1][3] == ["x"] and webui.calls[0][2] == {"is_chat": True}
    assert sum("FakeLlamaServer" in r.message for r in caplog.records) == 1, "said once, not every reply"
    assert "FakeLlamaServer" in ext.last_reply.markdown()


def test_fallback_on_a_specdec_error(ext, webui) -> None:
    ext.params.update(auto_configure=False, method="draft", draft_model="None")
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
    assert webui.calls[-1][0] == "HF"
    assert "draft" in ext.last_reply.note


def test_fallback_on_unsupported_samplers(ext, webui) -> None:
    assert reply(ext, PROMPT, PROMPT, state(presence_penalty=0.5), None, is_chat=True)[-1] == "webui reply"
    assert "presence_penalty" in ext.last_reply.note
    # samplers that only act when sampling do not matter for greedy decoding
    assert ext.unsupported_settings(state(min_p=0.1), 100) == []
    assert ext.unsupported_settings(state(min_p=0.1, do_sample=True, temperature=0.7), 100) == ["min_p=0.1"]


def test_the_extension_switched_off_uses_the_webui(ext, webui) -> None:
    ext.params["enabled"] = False
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
    assert webui.calls[-1][0] == "HF"


def test_ban_eos_token(ext, webui, tiny) -> None:
    model, tokenizer = tiny
    first = _first_greedy_token(model, tokenizer)
    # a tokenizer whose EOS is the token the model wants first: the reply is empty unless EOS is banned
    eos_first = _tokenizer()
    eos_first.eos_token = eos_first.convert_ids_to_tokens(first)
    webui.shared.tokenizer = eos_first
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True) in ([], [""])
    banned = reply(ext, PROMPT, PROMPT, state(ban_eos_token=True), None, is_chat=True)[-1]
    assert banned and banned == reference(model, eos_first, suppress=[first])


def test_truncation_keeps_the_end_of_the_prompt(ext, tiny) -> None:
    chunks = reply(ext, PROMPT, PROMPT, state(truncation_length=34, max_new_tokens=24), None, is_chat=True)
    assert chunks[-1] == reference(*tiny, keep=10)


def test_params_from_settings_yaml(webui, monkeypatch: pytest.MonkeyPatch) -> None:
    webui.shared.settings = {"specdec-method": "lookahead", "specdec-auto_configure": "false",
                             "specdec-num_speculative_tokens": "3", "specdec-window_size": 3}
    module = load_extension(monkeypatch)
    assert module.params["method"] == "lookahead" and module.params["auto_configure"] is False
    assert module.params["num_speculative_tokens"] == 3 and module.params["window_size"] == 3
    generator = module.build_generator(*(webui.shared.model, webui.shared.tokenizer))
    assert generator.method == "lookahead"
    assert reply(module, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == reference(webui.shared.model, webui.shared.tokenizer)


def test_draft_model_from_the_models_folder_is_loaded_once(ext, webui, tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    folder = Path(webui.shared.args.model_dir) / "tiny-draft"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (Path(webui.shared.args.model_dir) / "notes.txt").write_text("not a model")
    assert ext.list_draft_models() == ["None", "tiny-draft"]
    ext.params.update(draft_model="tiny-draft")
    first = reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1]
    loaded = ext._draft.model
    second = reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1]
    assert first == second == reference(model, tokenizer)
    assert ext.last_reply.method == "draft" and ext._draft.model is loaded
    assert ext.last_reply.acceptance_rate > 0.9  # the draft is the target itself


def _first_greedy_token(model: Any, tokenizer: Any) -> int:
    ids = [tokenizer.bos_token_id] + tokenizer.encode(PROMPT)
    with torch.inference_mode():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


def test_auto_configure_uses_the_hardware_profiles(ext, webui, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from specdec import profiles

    seen: dict[str, Any] = {}

    def configure(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return types.SimpleNamespace(
            profile="fake-cpu", device=types.SimpleNamespace(backend="cpu"), method="lookahead",
            num_speculative_tokens=None,
            lookahead=types.SimpleNamespace(model_dump=lambda: {"window_size": 3, "ngram_size": 3, "guess_size": 2}),
        )

    monkeypatch.setattr(profiles, "configure", configure)
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == reference(*tiny)
    assert ext.last_reply.method == "lookahead" and seen["target_loaded"] is True
    # a profile that wants a draft model when none is picked gets prompt lookup (nothing is downloaded)
    assert ext.auto_configuration(has_draft=False)[0] == "lookahead"
    ext._auto_cache.clear()
    monkeypatch.setattr(profiles, "configure", lambda **kw: types.SimpleNamespace(
        profile="p", device=types.SimpleNamespace(backend="cpu"), method="draft", num_speculative_tokens=4, lookahead=None))
    assert ext.auto_configuration(has_draft=False) == ("prompt_lookup", None, {})
    assert ext.auto_configuration(has_draft=True) == ("draft", 4, {})


def test_fallback_after_a_failure_runs_after_the_failed_attempt_is_freed(ext, webui, tiny) -> None:
    """An out-of-memory inside the target: the webui's generation starts only once that attempt's tensors are gone."""
    import weakref

    model, _ = tiny
    held: list[weakref.ref] = []

    def out_of_memory(module, inputs):
        activations = torch.empty(1 << 16)  # stands for the failed step's KV cache and activations
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    seen_alive: list[bool] = []
    own = webui.text_generation.generate_reply_HF

    def webui_generation(*args, **kwargs):
        seen_alive.append(held[-1]() is not None)
        yield from own(*args, **kwargs)

    webui.text_generation.generate_reply_HF = webui_generation
    handle = model.model.layers[0].register_forward_pre_hook(out_of_memory)
    try:
        assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
    finally:
        handle.remove()
    assert held and seen_alive == [False], "the failed attempt's tensors were still referenced at the fallback"
    assert "OutOfMemoryError" in ext.last_reply.note


def test_a_call_the_adapter_cannot_read_goes_to_the_webui_unchanged(ext, webui) -> None:
    from collections import UserDict

    odd_state = UserDict(state())  # a mapping, but not a dict: parse_call takes it for an old-style seed and fails
    assert reply(ext, PROMPT, PROMPT, odd_state, ["x"], is_chat=True)[-1] == "webui reply"
    assert webui.calls[-1][0] == "HF" and webui.calls[-1][1][2] is odd_state and webui.calls[-1][1][3] == ["x"]
