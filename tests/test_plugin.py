"""The text-generation-webui extension (plugin/specdec/script.py) against stub ``modules.*``.

The webui cannot be pip installed, so the few ``modules`` the adapter imports
are stubbed in ``sys.modules`` the way the webui provides them; the target is
a tiny random Llama and a byte-level tokenizer built in-process.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.proposers import REGISTRY, LookaheadOptions
from conftest import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "plugin" / "specdec" / "script.py"
PROMPT = "<|user|>abcabcabc abc abc<|assistant|>"


# --------------------------------------------------------------------------- tiny model and tokenizer
def _tokenizer() -> Any:
    """A character-level tokenizer: 256 tokens that each decode to whole characters, then <s>, </s>, chat markers.

    (A byte-level one would let the random tiny models write invalid UTF-8,
    which the webui's streaming never shows, leaving nothing to compare.)
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars + [f"\u00a7{i}" for i in range(256 - len(chars))])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    return fast


def _model(vocab: int, seed: int, bos: int | None = 256, eos: int | None = 257, pad: int | None = 257) -> Any:
    """A tiny Llama on the CPU whose config, and so generation config, carries these special ids: by default the
    byte tokenizer's BOS 256 and EOS/pad 257 (``</s>``)."""
    return tiny_model("llama", seed=seed, vocab=vocab, max_positions=256, bos=bos, eos=eos, pad=pad, device="cpu")


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
        self.text_generation.get_encoded_length = self._encoded_length
        self.chat = types.ModuleType("modules.chat")
        self.chat.generate_chat_prompt = self._chat_prompt
        self.package = types.ModuleType("modules")
        self.package.shared = self.shared
        self.package.logging_colors = self.logging
        self.package.text_generation = self.text_generation
        self.package.chat = self.chat
        self.active: list[tuple[Any, str]] = []  # other active extensions, as the webui's iterator gives them
        self.extensions = types.ModuleType("modules.extensions")
        self.extensions.iterator = lambda: iter(self.active)
        self.package.extensions = self.extensions

    def _encoded_length(self, prompt: str) -> int:
        return 1 + len(self.shared.tokenizer.encode(prompt))  # with the BOS, as the webui counts

    def _chat_prompt(self, user_input: str, state: dict, **kwargs: Any) -> str:
        """The webui's ``generate_chat_prompt`` in small: the rows and the new message in a template, and
        messages dropped one at a time, oldest first, while over ``truncation_length - max_new_tokens``."""
        rows = kwargs.get("history", state["history"])["internal"]
        messages = [(role, text) for row in rows for role, text in zip(("user", "assistant"), row) if text]
        if not kwargs.get("_continue"):
            messages.append(("user", user_input))

        def render() -> str:
            text = "".join(f"<|{role}|>{content}" for role, content in messages)
            return text if kwargs.get("_continue") else text + "<|assistant|>"

        while (
            len(messages) > 1 and self._encoded_length(render()) > state["truncation_length"] - state["max_new_tokens"]
        ):
            messages.pop(0)
        return render()

    def _own(self, name: str):
        def generate(
            question: str, original_question: str, state: dict, stopping_strings=None, is_chat=False
        ) -> Iterator[str]:
            self.calls.append((name, (question, original_question, state, stopping_strings), {"is_chat": is_chat}))
            yield "webui "
            yield "webui reply"

        return generate


@pytest.fixture
def webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny) -> Webui:
    stub = Webui(tmp_path)
    stub.shared.model, stub.shared.tokenizer = tiny
    for name, module in (
        ("modules", stub.package),
        ("modules.shared", stub.shared),
        ("modules.logging_colors", stub.logging),
        ("modules.text_generation", stub.text_generation),
        ("modules.chat", stub.chat),
        ("modules.extensions", stub.extensions),
    ):
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
        "max_new_tokens": 24,
        "auto_max_new_tokens": False,
        "truncation_length": 256,
        "temperature": 0,
        "do_sample": False,
        "top_p": 1,
        "top_k": 0,
        "min_p": 0,
        "typical_p": 1,
        "repetition_penalty": 1,
        "repetition_penalty_range": 1024,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "seed": -1,
        "add_bos_token": True,
        "ban_eos_token": False,
        "custom_token_bans": "",
        "skip_special_tokens": True,
        "custom_stopping_strings": "",
        "stream": True,
        "grammar_string": "",
        "negative_prompt": "",
        "guidance_scale": 1,
        "dry_multiplier": 0,
        "no_repeat_ngram_size": 0,
        "stop_event": None,
    }
    s.update(overrides)
    return s


def reference(
    model: Any,
    tokenizer: Any,
    prompt: str = PROMPT,
    max_new_tokens: int = 24,
    keep: int | None = None,
    suppress: list[int] | None = None,
) -> str:
    """What the webui's own greedy generation gives: ``generate`` called as the webui calls it.

    Only the tokenizer's EOS and no attention mask (transformers infers one from
    the model's ``pad_token_id``), then the tokens decoded one by one and
    joined, as the webui's streaming loop does.
    """
    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
    if keep is not None:
        ids = ids[-keep:]
    kwargs: dict[str, Any] = {"suppress_tokens": suppress} if suppress else {}
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[tokenizer.eos_token_id],
        **kwargs,
    )[0, len(ids) :]
    text, start, new = "", 0, []
    for t in out.tolist():
        if t == tokenizer.eos_token_id:
            break
        new.append(t)
        piece = tokenizer.decode(new[start:], skip_special_tokens=True)
        if "\ufffd" not in piece:
            text, start = text + piece, len(new)
    return text


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


def test_the_next_chat_turn_keeps_the_history_and_matches_the_webui(ext, tiny) -> None:
    first = reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1]
    assert ext.last_reply.cached_tokens == 0
    follow = PROMPT + first + " and then"
    assert reply(ext, follow, follow, state(), None, is_chat=True)[-1] == reference(*tiny, prompt=follow)
    assert 0 < ext.last_reply.cached_tokens < ext.last_reply.prompt_tokens
    assert "prompt tokens kept from the reply before" in ext.last_reply.markdown()


LONG_CONTEXT = 512  # a chat of short rows, so that a quarter of the context holds several


def _chat_at_the_limit(ext, webui, turns: int, **kwargs: Any) -> list[tuple[int, int, int]]:
    """``turns`` chat turns through the webui's prompt hook and generation hook, each reply checked against
    the webui's own for the same prompt. Per turn: rows dropped, prompt tokens, tokens kept from before."""
    history: dict[str, Any] = {"internal": [], "visible": [], "metadata": {}}
    seen = []
    for i in range(turns):
        message = f"q{i}"
        st = state(history=history, truncation_length=LONG_CONTEXT, max_new_tokens=8)
        prompt = ext.custom_generate_chat_prompt(message, st, history=history, **kwargs)
        if prompt is None:  # the webui builds it
            prompt = webui.chat.generate_chat_prompt(message, st, history=history, **kwargs)
        assert webui._encoded_length(prompt) <= LONG_CONTEXT - st["max_new_tokens"]
        answer = reply(ext, prompt, prompt, st, None, is_chat=True)[-1]
        assert answer == reference(*webui_tiny(webui), prompt=prompt, max_new_tokens=8)
        kept = [r for r in history["internal"] if f"<|user|>{r[0]}<|assistant|>" in prompt]
        seen.append((len(history["internal"]) - len(kept), ext.last_reply.prompt_tokens, ext.last_reply.cached_tokens))
        history["internal"].append([message, answer])
        history["visible"].append([message, answer])
    return seen


def webui_tiny(webui) -> tuple[Any, Any]:
    return webui.shared.model, webui.shared.tokenizer


def test_history_in_blocks_keeps_the_kv_cache_at_the_context_limit(ext, webui) -> None:
    """The webui drops one message at a time at the limit, so each reply from then on computes its prompt
    whole; with *history_in_blocks* rows go a quarter of the context at a time and the replies between
    cuts keep the KV cache. Every reply is still the webui's own for the prompt it was given."""
    assert ext.params["history_in_blocks"] is False
    tokenizer = webui.shared.tokenizer
    webui.shared.model = tiny_model("llama", seed=0, vocab=len(tokenizer), max_positions=LONG_CONTEXT, device="cpu")
    webuis = _chat_at_the_limit(ext, webui, 44)
    assert ext.HISTORY_IN_BLOCKS_LABEL in ext.last_reply.markdown(), "the panel says what would keep the cache"
    assert ext.custom_generate_chat_prompt("hi", state(history={"internal": []}), history={"internal": []}) is None
    ext.release("all")
    ext.params["history_in_blocks"] = True
    blocks = _chat_at_the_limit(ext, webui, 44)
    assert ext.HISTORY_IN_BLOCKS_LABEL not in ext.last_reply.markdown()
    at_limit = [i for i, (dropped, _, _) in enumerate(webuis) if dropped]
    assert len(at_limit) >= 4, webuis
    assert all(webuis[i][2] < webuis[i][1] // 2 for i in at_limit[1:]), f"the webui's own cut kept it: {webuis}"
    cuts = [i for i in range(1, len(blocks)) if blocks[i][0] != blocks[i - 1][0]]
    assert cuts and len(cuts) < len(at_limit) // 2, blocks
    for i in range(1, len(blocks)):
        if i not in cuts:
            assert blocks[i][2] >= blocks[i - 1][1] - 1, f"turn {i} computed the conversation again: {blocks}"


def test_history_in_blocks_keeps_a_row_being_continued(ext, webui) -> None:
    ext.params["history_in_blocks"] = True
    rows = [[f"question {i}: " + "tell me more " * 4, "answer " * 12] for i in range(8)]
    history = {"internal": rows, "visible": rows, "metadata": {}}
    prompt = ext.custom_generate_chat_prompt(
        "", state(history=history, truncation_length=200), history=history, _continue=True
    )
    assert prompt.endswith(rows[-1][1]) and rows[0][0] not in prompt


def test_another_extensions_chat_prompt_is_what_the_webui_gets(ext, webui, caplog) -> None:
    """The webui calls the first extension's ``custom_generate_chat_prompt`` only: specdec's must hand over to
    another's (superbooga, long_replies) rather than hide it, and then not cut the history itself."""
    other = types.SimpleNamespace(custom_generate_chat_prompt=lambda text, state, **kw: f"built by other: {text}")
    webui.active = [(ext, "specdec"), (types.SimpleNamespace(), "plain"), (other, "other")]
    history = {"internal": [["a", "b"]], "visible": [["a", "b"]], "metadata": {}}
    assert ext.custom_generate_chat_prompt("hi", state(history=history), history=history) == "built by other: hi"
    ext.params["history_in_blocks"] = True
    with caplog.at_level(logging.WARNING, logger="webui-stub"):
        assert ext.custom_generate_chat_prompt("hi", state(history=history), history=history) == "built by other: hi"
    assert any("other builds the chat prompt" in r.message for r in caplog.records)


def test_an_extension_that_changes_logits_sends_replies_to_the_webui(ext, webui) -> None:
    webui.active = [(ext, "specdec"), (types.SimpleNamespace(logits_processor_modifier=None), "bias")]
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
    assert "bias" in ext.last_reply.note


def test_the_log_line_says_what_the_e2e_scripts_chat_at_the_limit_reads(ext, tiny, caplog) -> None:
    """scripts/webui_e2e.py (``LIMIT_TURNS``) reads each reply's context and kept tokens from the webui's log,
    which wraps long lines."""
    spec = importlib.util.spec_from_file_location("webui_e2e", SCRIPT.parents[2] / "scripts" / "webui_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    first = reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1]
    follow = PROMPT + first + " and then"
    with caplog.at_level(logging.INFO, logger="webui-stub"):
        reply(ext, follow, follow, state(), None, is_chat=True)
    line = next(r.message for r in caplog.records if "output generated" in r.message)
    wrapped = "\n                         ".join(textwrap.wrap(line, 50))  # as the webui's log shows it
    for text in (line, wrapped):
        assert e2e.kept_counts(text) == [(ext.last_reply.prompt_tokens, ext.last_reply.cached_tokens)], text


def test_both_call_signatures(ext, tiny) -> None:
    new = reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    old = reply(ext, PROMPT, PROMPT, 1234, state(), None, is_chat=True)
    keywords = reply(ext, PROMPT, PROMPT, state=state(), stopping_strings=None, is_chat=True)
    assert new[-1] == old[-1] == keywords[-1] == reference(*tiny)


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


def test_a_draft_that_fails_to_load_is_not_loaded_again_for_every_reply(ext, webui, monkeypatch, caplog) -> None:
    """A draft load that fails (a .gguf draft took 30-40 s per try in a real webui) fails once per model and
    settings: later replies go to the webui at once, and a changed setting tries again."""
    import specdec.loading

    tries = []

    def failing(*args: Any, **kwargs: Any):
        tries.append(args[0])
        shown.append(ext.last_reply.markdown())  # what the panel's stats line shows meanwhile
        raise ValueError("GenerationConfig is invalid")

    shown: list[str] = []

    monkeypatch.setattr(specdec.loading, "load_model", failing)
    ext.params.update(draft_model="broken-draft")
    for _ in range(3):
        assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
    assert len(tries) == 1 and "GenerationConfig is invalid" in ext.last_reply.note
    assert shown[0].startswith("**Loading:** the draft model `broken-draft`")  # not a silent wait
    assert "Loading" not in ext.last_reply.markdown()
    in_use = ext.method_in_use()  # the panel's "In use" line no longer names the draft it cannot load
    assert in_use.startswith("**In use:** the webui's own generation") and "GenerationConfig is invalid" in in_use
    assert sum("generation failed" in r.message for r in caplog.records) == 1  # one traceback, not one a reply
    assert not any(r.message.startswith("specdec: specdec") for r in caplog.records)
    ext.params.update(draft_model="other-draft.gguf")
    assert "`draft`" in ext.method_in_use()  # another draft: not known to fail until a reply tries it
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    assert len(tries) == 2 and "de-quantizes" in shown[1]  # a .gguf's first load is slow: the panel says why
    models = Path(webui.shared.args.model_dir)
    models.mkdir(parents=True, exist_ok=True)
    (models / "other-draft.gguf").write_bytes(b"GGUF")  # the user puts the file there
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    assert len(tries) == 3


def test_no_model_loaded_is_said_as_the_webui_says_it(ext, webui, monkeypatch) -> None:
    checked = []
    utils = types.ModuleType("modules.utils")
    utils.check_model_loaded = lambda: checked.append(True) or (False, "No model is loaded.")
    monkeypatch.setitem(sys.modules, "modules.utils", utils)
    webui.package.utils = utils
    webui.shared.model = None
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True) == [""]
    assert checked == [True] and webui.calls == []  # no generation function called without a model


def test_a_manual_method_without_its_draft_names_the_panels_control(ext, webui) -> None:
    ext.params.update(auto_configure=False, method="draft", draft_model=ext.NO_DRAFT)
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    assert "*Draft model*" in ext.last_reply.note and "--draft" not in ext.last_reply.note


def test_settings_that_are_written_differently_are_read_or_said(ext, caplog) -> None:
    ext.apply_overrides({"specdec-method": "Lookahead", "specdec-window_size": "-3"})
    assert ext.params["method"] == "lookahead" and ext.params["window_size"] == 0
    assert any("window_size=-3 is negative" in r.message for r in caplog.records)
    ext.apply_overrides({"specdec-method": "jacobi"})
    assert ext.params["method"] == "prompt_lookup"
    assert any("unknown method 'jacobi'; using prompt_lookup" in r.message for r in caplog.records)


def test_fallback_on_unsupported_samplers(ext, webui) -> None:
    assert reply(ext, PROMPT, PROMPT, state(presence_penalty=0.5), None, is_chat=True)[-1] == "webui reply"
    assert "presence_penalty" in ext.last_reply.note


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
    webui.shared.settings = {
        "specdec-method": "lookahead",
        "specdec-auto_configure": "false",
        "specdec-num_speculative_tokens": "3",
        "specdec-window_size": 3,
    }
    module = load_extension(monkeypatch)
    assert module.params["method"] == "lookahead" and module.params["auto_configure"] is False
    assert module.params["num_speculative_tokens"] == 3 and module.params["window_size"] == 3
    generator = module.build_generator(*(webui.shared.model, webui.shared.tokenizer))
    assert generator.method == "lookahead"
    # W from settings.yaml, N and G the library's own defaults
    assert generator.options == LookaheadOptions(window_size=3)
    assert (module.params["ngram_size"], module.params["guess_size"]) == (
        LookaheadOptions.ngram_size,
        LookaheadOptions.guess_size,
    )
    assert module.METHOD_CHOICES == tuple(REGISTRY)
    assert reply(module, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == reference(
        webui.shared.model, webui.shared.tokenizer
    )


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


def test_a_draft_of_another_tokenizer_goes_to_the_webui_with_the_panels_way_out(ext, webui, tiny) -> None:
    from conftest import tiny_model_folder

    model, tokenizer = tiny
    tiny_model_folder(Path(webui.shared.args.model_dir) / "word-draft", _model(len(tokenizer), 3))
    ext.params.update(draft_model="word-draft")
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
    note = ext.last_reply.note
    assert "tokenizer differs" in note and "*Draft model*" in note and "--method" not in note


def test_the_static_cache_setting_reaches_the_generator(ext, webui, tiny) -> None:
    """Checked (the default): the static path where it pays, on CUDA; unchecked: the eager path everywhere,
    the way out when a GPU's static cache does not fit or its graphs misbehave."""
    webui.shared.settings["specdec-static_cache"] = "false"  # as settings.yaml may give it
    ext.apply_overrides(webui.shared.settings)
    assert ext.params["static_cache"] is False
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == reference(*tiny)
    off = ext._generator.generator
    assert off.static_cache is False
    ext.params["static_cache"] = True
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == reference(*tiny)
    assert ext._generator.generator is not off, "the setting shapes the generator"
    model = tiny[0]
    assert ext._generator.generator.static_cache == (next(model.parameters()).device.type == "cuda")
    assert ext.panel_state()["static_cache"] is True


def _first_greedy_token(model: Any, tokenizer: Any) -> int:
    ids = [tokenizer.bos_token_id] + tokenizer.encode(PROMPT)
    with torch.inference_mode():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


def test_auto_configure_uses_specdecs_own_auto(ext, webui, tiny) -> None:
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == reference(*tiny)
    assert ext.last_reply.method == "prompt_lookup"
    assert "auto-configure" in ext.last_reply.markdown() and "decoded plainly" in ext.last_reply.markdown()
    assert ext.auto_configuration(has_draft=True)[0] == "draft"


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

    ext.params["medusa_heads"] = str(Path(__file__).parent)  # a folder that exists
    assert ext.auto_configuration(has_draft=False)[0] == "medusa"
    ext.params["medusa_heads"] = "/no/such/heads"  # auto-configure goes on without them, and says why
    method, why = ext.auto_configuration(has_draft=False)
    assert method == "prompt_lookup" and "/no/such/heads` was not found" in why


# --------------------------------------------------------------------------- the webui's exact inputs
def _greedy_tokens(model: Any, tokenizer: Any, n: int) -> list[int]:
    ids = [tokenizer.bos_token_id] + tokenizer.encode(PROMPT)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_tokenizer_eos_other_than_the_configs_stops_where_the_webui_stops(ext, webui) -> None:
    """The webui stops at the tokenizer's EOS only (here a token the model writes mid-reply), not the config's."""
    tokenizer = _tokenizer()
    model = _model(len(tokenizer), 3)
    stop_at = _greedy_tokens(model, tokenizer, 12)[6]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop_at)
    webui.shared.model, webui.shared.tokenizer = model, tokenizer
    expected = reference(model, tokenizer)
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == expected
    assert ext.last_reply.method == "prompt_lookup" and ext.last_reply.finish_reason == "eos"
    assert webui.calls == []


def test_a_prompt_that_transformers_would_mask_is_generated_without_those_tokens(ext, webui, caplog) -> None:
    """The issue's case: tokenizer EOS <|im_start|>-like, config pad = the <|im_end|>-like token inside the prompt.
    transformers masks those tokens; specdec generates from the prompt without them, the webui's very text."""
    tokenizer = _tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|assistant|>")
    model = _model(len(tokenizer), 0, eos=im_end, pad=im_end)
    webui.shared.model, webui.shared.tokenizer = model, tokenizer
    turns = "<|user|>abc abc<|assistant|>abcabc<|assistant|><|user|>abc abc abc"  # as a chat's ends of messages
    assert tokenizer.encode(turns).count(im_end) == 2 and tokenizer.encode(turns)[-1] != im_end
    for prompt in (turns, "<|user|>abcabcabc abc abc"):  # with the masked token and without
        assert reply(ext, prompt, prompt, state(), None, is_chat=True)[-1] == reference(model, tokenizer, prompt=prompt)
        assert ext.last_reply.method == "prompt_lookup"
    assert webui.calls == []
    # the masked token last (its own row gives the first new token, at position 0), or a repetition penalty,
    # which still counts the masked tokens (they stay in transformers' input ids): the webui's own generation
    with caplog.at_level(logging.WARNING, logger="webui-stub"):
        assert tokenizer.encode(PROMPT)[-1] == im_end
        assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
        assert "pad_token_id" in ext.last_reply.note and "last token" in ext.last_reply.note
        assert reply(ext, turns, turns, state(repetition_penalty=1.3), None, is_chat=True)[-1] == "webui reply"
        assert "pad_token_id" in ext.last_reply.note and "repetition_penalty" in ext.last_reply.note
    assert [c[0] for c in webui.calls] == ["HF", "HF"]


@pytest.mark.parametrize("case", ["pad_is_eos", "no_pad"])
def test_eos_inside_the_prompt_without_masking(ext, webui, case: str) -> None:
    """pad == EOS, or no pad at all (transformers then pads with EOS): nothing is masked and specdec generates."""
    tokenizer = _tokenizer()
    model = _model(len(tokenizer), 1)
    if case == "no_pad":
        model.generation_config.pad_token_id = None
    webui.shared.model, webui.shared.tokenizer = model, tokenizer
    prompt = "<|user|>abc</s>abcabc abc abc<|assistant|>"
    assert 257 in tokenizer.encode(prompt)
    assert reply(ext, prompt, prompt, state(), None, is_chat=True)[-1] == reference(model, tokenizer, prompt=prompt)
    assert ext.last_reply.method == "prompt_lookup" and webui.calls == []


def test_truncation_to_zero_keeps_the_whole_prompt_as_the_webui_does(ext, tiny) -> None:
    """The webui keeps ``ids[-(truncation_length - max_new_tokens):]``; Python's ``ids[-0:]`` is every token."""
    _, tokenizer = tiny
    whole = [tokenizer.bos_token_id] + tokenizer.encode(PROMPT)
    assert ext._encode(PROMPT, state(truncation_length=24, max_new_tokens=24), tokenizer) == whole
    assert ext._encode(PROMPT, state(truncation_length=34, max_new_tokens=24), tokenizer) == whole[-10:]


def test_a_reply_past_the_context_goes_to_the_webui(ext, webui) -> None:
    assert (
        reply(ext, PROMPT, PROMPT, state(max_new_tokens=400, truncation_length=1000), None, is_chat=True)[-1]
        == "webui reply"
    )
    assert "context" in ext.last_reply.note


def test_generation_config_processors_go_to_the_webui(ext, webui) -> None:
    tokenizer = _tokenizer()
    model = _model(len(tokenizer), 0)
    model.generation_config.min_new_tokens = 5
    webui.shared.model, webui.shared.tokenizer = model, tokenizer
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == "webui reply"
    assert "min_new_tokens" in ext.last_reply.note


def test_the_models_own_suppress_tokens_apply_unless_the_webui_bans_tokens(ext, webui) -> None:
    tokenizer = _tokenizer()
    model = _model(len(tokenizer), 0)
    first = _greedy_tokens(model, tokenizer, 1)[0]
    model.generation_config.suppress_tokens = [first]
    webui.shared.model, webui.shared.tokenizer = model, tokenizer
    assert reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)[-1] == reference(model, tokenizer)
    banned = state(custom_token_bans="65")
    out = model.generate(
        torch.tensor([[256] + tokenizer.encode(PROMPT)]),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=[257],
        suppress_tokens=[65],
    )[0, 1 + len(tokenizer.encode(PROMPT)) :]
    assert reply(ext, PROMPT, PROMPT, banned, None, is_chat=True)[-1] == tokenizer.decode(
        [t for t in out.tolist() if t != 257], skip_special_tokens=True
    )


def test_not_streaming_decodes_the_whole_output_once(ext, tiny) -> None:
    chunks = reply(ext, PROMPT, PROMPT, state(stream=False), None, is_chat=True)
    assert chunks == [reference(*tiny)]


# --------------------------------------------------------------------------- costly state kept
def test_one_generator_is_kept_across_replies_and_released(ext, webui, tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    first = ext._generator.generator
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    assert first is not None and ext._generator.generator is first, "kept across replies"
    # the draft's learnt costs live in the kept generator too
    folder = Path(webui.shared.args.model_dir) / "tiny-draft"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ext.params["draft_model"] = "tiny-draft"
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    with_draft = ext._generator.generator
    assert with_draft is not first and with_draft.method == "draft"
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    assert ext._generator.generator is with_draft
    ext.params["draft_model"] = "None"
    ext.release_stale()
    assert ext._generator.generator is None and ext._draft.model is None, "draft set to None releases it"
    # another model loaded by the webui (same class, maybe the same address later): a new generator
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    webui.shared.model = _model(len(tokenizer), 5)
    ext.release_stale()
    assert ext._generator.target is None
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    assert ext._generator.target is webui.shared.model
    # unloaded, then specdec off
    webui.shared.model = None
    ext.release_stale()
    assert ext._generator.generator is None
    webui.shared.model = model
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    ext.params["enabled"] = False
    ext.release_stale()
    assert ext._generator.generator is None


def test_a_changed_setting_builds_a_new_generator(ext, webui) -> None:
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    auto = ext._generator.generator
    ext.params.update(auto_configure=False, method="lookahead")
    reply(ext, PROMPT, PROMPT, state(), None, is_chat=True)
    assert ext._generator.generator is not auto and ext._generator.generator.method == "lookahead"
    assert ext.last_reply.method == "lookahead"


# --------------------------------------------------------------------------- the panel
def test_the_panel_says_which_method_is_used_and_why(ext) -> None:
    assert "prompt_lookup" in ext.method_in_use() and "auto-configure" in ext.method_in_use()
    assert "ignored" in ext.method_label()
    ext.params["draft_model"] = "tiny-draft"
    assert "`draft`" in ext.method_in_use()
    ext.params.update(auto_configure=False, method="lookahead")
    assert ext.method_in_use() == "**In use:** `lookahead`, chosen by hand." and ext.method_label() == "Method"
    ext.params["enabled"] = False
    assert "webui's own generation" in ext.method_in_use()


def test_the_panel_warns_at_once_when_the_chosen_method_cannot_run(ext, tmp_path: Path) -> None:
    """A method picked by hand that needs what is not set says so in the "In use" line when picked,
    not only after a reply went to the webui."""
    ext.params.update(auto_configure=False, method="draft", draft_model=ext.NO_DRAFT)
    assert "webui's own generation" in ext.method_in_use() and "Draft model" in ext.method_in_use()
    ext.params.update(method="medusa", medusa_heads="")
    assert "webui's own generation" in ext.method_in_use() and "Medusa heads" in ext.method_in_use()
    ext.params.update(medusa_heads=str(tmp_path / "no-such-heads"))
    assert "webui's own generation" in ext.method_in_use() and "no-such-heads` was not found" in ext.method_in_use()
    ext.params.update(auto_configure=True)  # auto-configure picks Medusa when heads are found, else goes on
    assert "`prompt_lookup`" in ext.method_in_use() and "was not found" in ext.method_in_use()
    ext.params.update(auto_configure=False, medusa_heads=str(tmp_path))
    assert ext.method_in_use() == "**In use:** `medusa`, chosen by hand."


def test_the_method_label_follows_the_checkbox_it_is_given(ext) -> None:
    # the label is made while the checkbox's own setter may not have run yet: it reads the value given
    ext.params["auto_configure"] = True
    assert ext.method_label(False) == "Method" and "ignored" in ext.method_label(True)
    assert "ignored" in ext.method_label()


def test_a_page_loaded_later_shows_the_settings_in_force(ext, webui, tmp_path: Path) -> None:
    """Settings are one per server: a reload or a second tab shows what another tab set, and the
    draft model in use stays among the choices even when it left the models folder."""
    ext.params.update(auto_configure=False, method="lookahead", window_size=7, draft_model="gone-draft")
    ext.last_reply.method, ext.last_reply.note = "webui", "a note"
    now = ext.panel_state()
    assert set(ext.PANEL_PARAMS) <= set(now)
    assert {name: now[name] for name in ext.PANEL_PARAMS} == {name: ext.params[name] for name in ext.PANEL_PARAMS}
    assert now["method"] == "lookahead" and now["window_size"] == 7 and now["manual"]
    assert now["method_label"] == "Method" and now["in_use"] == "**In use:** `lookahead`, chosen by hand."
    assert "gone-draft" in now["draft_choices"] and ext.NO_DRAFT in now["draft_choices"]
    assert now["stats"] == ext.last_reply.markdown() and "a note" in now["stats"]
