"""The text-generation-webui extension's request logic, without the webui.

The extension (``plugin/specdec/script.py``) hands a reply to specdec only
when specdec reproduces what the webui's own generation would give. What that
takes is read from the call and the webui's generation ``state`` (the dict of
its settings) alone, so it lives here and is tested without the webui: which
call signature the webui used, its stop strings, the settings specdec cannot
reproduce, what transformers would add or mask when the webui calls
``generate``, and the arguments of the reply.

The API server (:mod:`specdec.server`) reads OpenAI's request fields instead
(``stop``, ``n``, ``logprobs``...) and refuses what it cannot do with a 400;
nothing here is shared with it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from .errors import (
    MissingDraftError,
    MissingHeadsError,
    ModelNotFoundError,
    SpecdecError,
    StaticCacheMemoryError,
    UnsupportedModelError,
    VocabularyMismatchError,
)


# --------------------------------------------------------------------------- the call
@dataclass
class Request:
    """One call of the extension's ``custom_generate_reply``, whichever signature the webui used."""

    question: str
    original_question: str
    state: dict[str, Any]
    stopping_strings: list[str] | None
    is_chat: bool
    seed: int | None = None  # passed positionally by older webui releases
    old_signature: bool = False

    @property
    def webui_seed(self) -> int:
        """The seed the webui uses for this call: the call's own, else the state's (-1 = a random one)."""
        return self.seed if self.seed is not None else int(self.state.get("seed", -1))


def parse_call(question: str, original_question: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Request:
    """Accept ``(q, oq, state, stopping_strings=None, is_chat=False)`` and the older ``(q, oq, seed, state, ...)``."""
    rest = list(args)
    seed = kwargs.pop("seed", None)
    old = seed is not None
    if rest and not isinstance(rest[0], dict):
        seed, rest, old = rest[0], rest[1:], True
    state = rest.pop(0) if rest else kwargs.pop("state")
    stopping = rest.pop(0) if rest else kwargs.pop("stopping_strings", None)
    is_chat = rest.pop(0) if rest else kwargs.pop("is_chat", False)
    return Request(
        question=question,
        original_question=original_question,
        state=state,
        stopping_strings=stopping,
        is_chat=bool(is_chat),
        seed=None if seed is None else int(seed),
        old_signature=old,
    )


# --------------------------------------------------------------------------- stop strings
def stop_strings(request: Request) -> list[str]:
    """The stopping strings of the call plus the custom ones of ``state`` (a list or ``"a", "b"`` text)."""
    found: list[str] = []
    for item in (request.stopping_strings, request.state.get("custom_stopping_strings")):
        if isinstance(item, str):
            text = item.strip()
            if not text:
                continue
            try:
                parsed = ast.literal_eval(f"[{text}]")
            except (ValueError, SyntaxError):
                parsed = [text]
            item = parsed
        if isinstance(item, (list, tuple)):
            found.extend(str(s) for s in item if isinstance(s, str) and s)
    return list(dict.fromkeys(found))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
    return (text[:cut], True) if cut != -1 else (text, False)


# --------------------------------------------------------------------------- sampling
def is_greedy(state: dict[str, Any]) -> bool:
    """``do_sample=False`` or temperature 0 means greedy decoding."""
    return not state.get("do_sample", True) or float(state.get("temperature", 1.0)) == 0.0


def new_tokens_limit(state: dict[str, Any], prompt_tokens: int) -> int:
    """``max_new_tokens``, or with ``auto_max_new_tokens`` what ``truncation_length`` leaves after the prompt."""
    max_new = int(state.get("max_new_tokens", 512))
    if state.get("auto_max_new_tokens"):
        max_new = int(state.get("truncation_length", 0) or 0) - prompt_tokens
    return max_new


def sampling_arguments(state: dict[str, Any]) -> dict[str, Any]:
    """``temperature``, ``top_k``, ``top_p`` and ``repetition_penalty`` for :meth:`SpeculativeGenerator.stream`.

    Greedy settings (:func:`is_greedy`) give temperature 0 and no top-k/top-p, whatever the state holds;
    the repetition penalty applies either way.
    """
    greedy = is_greedy(state)
    return {
        "temperature": 0.0 if greedy else float(state.get("temperature", 1.0)),
        "top_k": 0 if greedy else int(state.get("top_k", 0) or 0),
        "top_p": 1.0 if greedy else float(state.get("top_p", 1.0) or 1.0),
        "repetition_penalty": float(state.get("repetition_penalty", 1.0) or 1.0),
    }


# transformers' processors and warpers in the webui's order (its default ``sampler_priority``), named as the
# webui names them; specdec applies the active ones in this order too (:func:`specdec.sampling.process_logits`)
_SPECDEC_ORDER = ("repetition_penalty", "temperature", "top_k", "top_p")
# pairs of them whose order changes the result (a penalty or a temperature commutes with the others listed here)
_ORDER_MATTERS = (
    ("repetition_penalty", "top_k"),
    ("repetition_penalty", "top_p"),
    ("temperature", "top_p"),
    ("top_k", "top_p"),
)
_DEFAULT_PRIORITY = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "dry",
    "temperature",
    "dynamic_temperature",
    "quadratic_sampling",
    "top_n_sigma",
    "top_k",
    "top_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "tfs",
    "top_a",
    "min_p",
    "adaptive_p",
    "mirostat",
    "xtc",
    "encoder_repetition_penalty",
    "no_repeat_ngram",
)


def sampler_order(state: dict[str, Any]) -> list[str]:
    """The active samplers of :data:`_SPECDEC_ORDER` in the order the webui's sampler hook applies them.

    The webui sorts its processors by ``sampler_priority`` (a name it does not
    list sorts first), after moving ``temperature`` last when
    ``temperature_last`` is set.
    """
    priority = state.get("sampler_priority")
    if isinstance(priority, str):
        priority = [p.strip() for p in priority.replace("\n", ",").split(",") if p.strip()]
    priority = list(priority) if isinstance(priority, (list, tuple)) and priority else list(_DEFAULT_PRIORITY)
    if state.get("temperature_last"):
        for name in ("temperature", "dynamic_temperature", "quadratic_sampling"):
            if name in priority:
                priority.remove(name)
            priority.append(name)
    active = {
        "repetition_penalty": float(state.get("repetition_penalty", 1.0) or 1.0) != 1.0,
        "temperature": not is_greedy(state) and float(state.get("temperature", 1.0)) != 1.0,
        "top_k": not is_greedy(state) and int(state.get("top_k", 0) or 0) > 0,
        "top_p": not is_greedy(state) and float(state.get("top_p", 1.0) or 1.0) < 1.0,
    }
    names = [n for n in _SPECDEC_ORDER if active[n]]
    return sorted(names, key=lambda n: priority.index(n) if n in priority else -1)


# --------------------------------------------------------------------------- what specdec cannot reproduce
# Sampler settings of the webui that specdec does not implement, with their
# neutral values. "always" ones change greedy output too; the others only act
# when sampling.
_ALWAYS_NEUTRAL: dict[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "dry_multiplier": 0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1,
    "guidance_scale": 1,
    "penalty_alpha": 0,
    "negative_prompt": "",
    "grammar_string": "",
    "prompt_lookup_num_tokens": 0,  # the webui's own prompt lookup (assisted generation) can change its output
}
_SAMPLING_NEUTRAL: dict[str, Any] = {
    "min_p": 0,
    "typical_p": 1,
    "tfs": 1,
    "top_a": 0,
    "epsilon_cutoff": 0,
    "eta_cutoff": 0,
    "xtc_probability": 0,
    "top_n_sigma": 0,
    "smoothing_factor": 0,
    "dynamic_temperature": False,
    "mirostat_mode": 0,
    "adaptive_target": 0,
}


def unsupported_settings(state: dict[str, Any], total_tokens: int) -> list[str]:
    """Settings of ``state`` that specdec cannot reproduce exactly (empty when it can).

    Args:
        state: the webui's generation state.
        total_tokens: prompt length plus ``max_new_tokens`` (the webui's
            repetition penalty looks only at the last ``repetition_penalty_range`` tokens).
    """
    found = [
        f"{k}={state[k]!r}" for k, neutral in _ALWAYS_NEUTRAL.items() if k in state and state[k] not in (neutral, None)
    ]
    if state.get("logits_processor"):
        found.append("logits processors (logit_bias or logprobs of the request, or another extension's)")
    penalty_range = int(state.get("repetition_penalty_range", 0) or 0)
    if float(state.get("repetition_penalty", 1.0)) != 1.0 and 0 < penalty_range < total_tokens:
        found.append(f"repetition_penalty_range={penalty_range} (shorter than the context)")
    if not is_greedy(state):
        found += [f"{k}={state[k]!r}" for k, neutral in _SAMPLING_NEUTRAL.items() if k in state and state[k] != neutral]
    order = sampler_order(state)
    if any(a in order and b in order and order.index(a) > order.index(b) for a, b in _ORDER_MATTERS):
        found.append(f"sampler_priority applying {' -> '.join(order)}")
    return found


# fields of a model's generation config that add logits processors the webui does not override
_GENERATION_CONFIG_NEUTRAL: dict[str, Any] = {
    "min_length": 0,
    "min_new_tokens": None,
    "begin_suppress_tokens": None,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
}


def generation_config_problems(model: Any) -> list[str]:
    """Fields of ``model.generation_config`` whose processors transformers would add and specdec cannot apply."""
    config = getattr(model, "generation_config", None)
    found = []
    for name, neutral in _GENERATION_CONFIG_NEUTRAL.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None, 0, False, [], ()):
            found.append(f"the model's generation_config.{name}={value!r}")
    return found


def visible_prompt(prompt_ids: list[int], model: Any, eos_ids: list[int]) -> list[int] | None:
    """The prompt as transformers' ``generate`` reads it when the webui calls it: without the tokens it masks;
    None when no prompt gives the same reply.

    The webui passes no attention mask, so transformers infers one: when the
    generation config's ``pad_token_id`` (else the first EOS id) is not one of
    the EOS ids, every prompt token equal to it is masked out. No position
    attends to a masked token, and the positions after it shift down (they are
    numbered by the mask's running sum), so the reply is the one to the prompt
    without those tokens, as long as the last one is not masked: the first new
    token is read off the last token's own row, which a masked token computes
    at position 0 (None then). (A GGUF conversion whose tokenizer names another
    EOS than its config has the ``<|im_end|>`` inside every chat prompt masked so.)
    """
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if pad is None or int(pad) in eos_ids:
        return prompt_ids  # no pad: transformers pads with eos_ids[0], and pad == EOS infers no mask
    pad = int(pad)
    if prompt_ids and prompt_ids[-1] == pad:
        return None
    return [t for t in prompt_ids if t != pad]


# --------------------------------------------------------------------------- what generate is given
def webui_eos_ids(tokenizer: Any) -> list[int]:
    """The EOS ids the webui passes to ``generate``: the tokenizer's EOS alone (not the model config's)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if eos is not None else []


def token_bans(state: dict[str, Any], tokenizer: Any, model: Any = None) -> list[int]:
    """What ``generate`` suppresses for the webui: EOS when ``ban_eos_token``, plus ``custom_token_bans``.

    The webui passes these as ``suppress_tokens``, which replaces the model's
    own ``generation_config.suppress_tokens``; when it passes none, the model's apply.
    """
    bans: list[int] = []
    if state.get("ban_eos_token") and getattr(tokenizer, "eos_token_id", None) is not None:
        bans.append(int(tokenizer.eos_token_id))
    custom = state.get("custom_token_bans") or ""
    bans += [int(x) for x in str(custom).split(",") if x.strip()]
    if not bans and model is not None:
        bans = [int(t) for t in (getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or [])]
    return bans


# --------------------------------------------------------------------------- the chat history at the context limit
HISTORY_IN_BLOCKS_LABEL = "At the context limit, drop old messages a quarter of the context at a time"
"""The panel's checkbox for ``history_in_blocks`` (off by default: it changes the prompt the webui gives)."""

_ROW_KEY = re.compile(r"(user|assistant)_(\d+)")


def drop_rows(history: dict[str, Any], k: int) -> dict[str, Any]:
    """The webui's chat ``history`` without its first ``k`` rows (a row is a user message and the reply).

    ``internal`` and ``visible`` lose them; ``metadata`` keeps its per-row entries (``user_3``,
    ``assistant_3``: attachments, tool calls) for the rows that stay, numbered from the new first row.
    """
    metadata: dict[str, Any] = {}
    for key, value in (history.get("metadata") or {}).items():
        match = _ROW_KEY.fullmatch(key)
        if match is None:
            metadata[key] = value
        elif int(match[2]) >= k:
            metadata[f"{match[1]}_{int(match[2]) - k}"] = value
    return {
        **history,
        "internal": list(history.get("internal", []))[k:],
        "visible": list(history.get("visible", []))[k:],
        "metadata": metadata,
    }


# --------------------------------------------------------------------------- errors, worded for the panel
STATIC_CACHE_LABEL = "Static KV cache + CUDA graphs (GPU)"
"""The panel's checkbox for ``static_cache`` (checked: on where it pays, on CUDA; unchecked: the eager path)."""


def panel_hint(error: SpecdecError) -> str | None:
    """What a webui user can do about ``error``.

    The library's hints name CLI flags and API keywords (``--no-static-cache``, ``--method``), which a
    webui user cannot pass; for the errors a reply in the webui can meet, this names the panel's
    controls instead. Other errors keep the library's hint.
    """
    if isinstance(error, StaticCacheMemoryError):
        return f"untick *{STATIC_CACHE_LABEL}* in the specdec panel, or lower max_new_tokens or the truncation length"
    if isinstance(error, VocabularyMismatchError):
        return (
            "pick a draft of the same tokenizer family under *Draft model*, or set it to None "
            "(prompt lookup needs no draft)"
        )
    if isinstance(error, UnsupportedModelError):
        return "load the model with sdpa or eager attention, or pick the method prompt_lookup"
    if isinstance(error, ModelNotFoundError):
        return "pick another draft model under *Draft model* (*Refresh list* shows what the models folder holds)"
    if isinstance(error, MissingDraftError):
        return "pick a draft under *Draft model*, or another method (prompt_lookup needs no draft)"
    if isinstance(error, MissingHeadsError):
        return "give the folder of heads trained for this model as *Medusa heads folder*, or pick another method"
    return error.hint
