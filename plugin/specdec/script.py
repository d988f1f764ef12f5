"""specdec for text-generation-webui: lossless speculative decoding in place of the webui's generation.

A thin adapter over the ``specdec`` package. The webui calls
:func:`custom_generate_reply` instead of its own generation function; this
module turns the webui's ``state`` into :meth:`specdec.SpeculativeGenerator.stream`
arguments, uses the model the webui has loaded (``modules.shared.model``) as
the target and yields the cumulative reply text, as the webui expects. What
can be read from the call and the state alone (its signature, stop strings,
settings specdec cannot reproduce, sampling arguments) is in :mod:`specdec.webui`.

Whenever speculative decoding cannot reproduce what the webui itself would
generate (a model not run by transformers, a sampler specdec does not
implement, an error), it says so once in the log and in the panel, and hands
the reply back to the webui's own generation function, so the chat never
breaks. With greedy settings the reply is the same text the webui produces
with the extension off.

Every entry of :data:`params` can be set in the webui's settings.yaml as
``specdec-<name>`` (e.g. ``specdec-method: lookahead``).
"""

from __future__ import annotations

import inspect
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules import shared
from modules.logging_colors import logger

try:
    from specdec.history import KeptCuts, drop_count
    from specdec.proposers import REGISTRY, LookaheadOptions
    from specdec.webui import (
        HISTORY_IN_BLOCKS_LABEL,
        STATIC_CACHE_LABEL,
        Request,
        cut_at_stop,
        drop_rows,
        generation_config_problems,
        new_tokens_limit,
        panel_hint,
        parse_call,
        sampling_arguments,
        stop_strings,
        token_bans,
        unsupported_settings,
        visible_prompt,
        webui_eos_ids,
    )
except ImportError as e:  # the webui's Python lacks the package: say how to install it, not only the traceback
    raise ImportError(
        f"the specdec extension needs the specdec package in the webui's Python ({e}); "
        "run `python install.py WEBUI_DIR` from the specdec checkout"
    ) from e

EXTENSION_NAME = "specdec"

METHOD_CHOICES: tuple[str, ...] = tuple(REGISTRY)  # "auto" is the auto_configure switch
NO_DRAFT = "None"
_LOOKAHEAD = LookaheadOptions()  # the library's defaults

params: dict[str, Any] = {
    "display_name": "Speculative decoding (specdec)",
    "is_tab": False,
    "enabled": True,
    # auto_configure picks the method (and adapts the draft length) by itself;
    # switch it off to use `method` and `num_speculative_tokens` as given.
    "auto_configure": True,
    "method": "prompt_lookup",
    "draft_model": NO_DRAFT,  # a folder or .gguf file in the webui's models folder
    "num_speculative_tokens": 0,  # 0 = adaptive
    "window_size": _LOOKAHEAD.window_size,  # lookahead W
    "ngram_size": _LOOKAHEAD.ngram_size,  # lookahead N
    "guess_size": _LOOKAHEAD.guess_size,  # lookahead G
    "medusa_heads": "",  # folder of Medusa heads trained for the loaded model
    # on a GPU: a preallocated KV cache and steps replayed as CUDA graphs (no effect on a CPU, where the
    # eager path is the faster one); off runs the eager path everywhere
    "static_cache": True,
    # at the context limit the webui drops old messages one at a time, so that from then on every reply's
    # prompt starts elsewhere and is computed whole; on, enough go to free a quarter of the context and
    # the replies after keep the KV cache (the model sees less history than the webui would give it)
    "history_in_blocks": False,
}

_INT_PARAMS = ("num_speculative_tokens", "window_size", "ngram_size", "guess_size")
_BOOL_PARAMS = ("enabled", "auto_configure", "static_cache", "history_in_blocks")


# --------------------------------------------------------------------------- state of the extension
@dataclass
class LastReply:
    """What the panel shows about the last reply."""

    method: str = ""
    tokens_per_second: float = 0.0
    mean_accepted_length: float = 0.0
    acceptance_rate: float = 0.0
    new_tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # the prompt's first tokens whose KV cache was kept from the reply before
    capture_seconds: float = 0.0  # spent capturing CUDA graphs (first replies after a load only)
    finish_reason: str = ""
    note: str = ""  # why the webui's own generation was used, if it was
    choice: str = ""  # the method specdec used and why
    advice: str = ""  # what a setting of the panel would have saved in this reply
    loading: str = ""  # what is being loaded for the reply under way (a draft's first load can take a minute)

    def markdown(self) -> str:
        """The stats as a short Markdown block (after what is being loaded, while it is)."""
        stats = self._stats()
        return f"**Loading:** {self.loading}\n\n{stats}" if self.loading else stats

    def _stats(self) -> str:
        if not self.method and not self.note:
            return "*No reply generated with specdec yet.*"
        if self.method == "webui":
            return f"**Last reply:** generated by the webui itself. {self.note}"
        return (
            f"**Last reply:** {self.new_tokens} tokens in {self.seconds:.2f} s, "
            f"**{self.tokens_per_second:.2f} tok/s** · method `{self.method}` · "
            f"mean accepted length {self.mean_accepted_length:.2f} (incl. the bonus token) · "
            f"acceptance rate {self.acceptance_rate:.0%}"
            + (
                f" · {self.cached_tokens} of {self.prompt_tokens} prompt tokens kept from the reply before"
                if self.cached_tokens
                else ""
            )
            + (f" · CUDA graphs captured in {self.capture_seconds:.2f} s" if self.capture_seconds else "")
            + (f" · {self.note}" if self.note else "")
            + (f"\n\n{self.choice}" if self.choice else "")
            + (f"\n\n{self.advice}" if self.advice else "")
        )


@dataclass
class _DraftCache:
    """The draft model, loaded once and kept until its name, dtype or device changes."""

    key: tuple[str, str, str] | None = None
    model: Any = None
    tokenizer: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _GeneratorCache:
    """One generator for the loaded model, kept across replies with what it learnt and built.

    The int8 draft copy, the vocabulary check, the learnt costs and Medusa
    heads live in the generator. ``target`` and ``tokenizer`` are held
    (strongly) while cached, so comparing them with ``is`` against the webui's
    ``shared.model`` is sound: an object cannot be replaced by another at the
    same address while it is referenced here. :func:`release_stale` lets go
    as soon as the webui loads another model or unloads it, specdec is
    switched off or the draft is set to None.
    """

    target: Any = None
    tokenizer: Any = None
    key: tuple[Any, ...] = ()
    generator: Any = None
    choice: str = ""  # the method in use and why, for the panel
    failed: _Failure | None = None  # the last build that failed


@dataclass
class _Failure:
    """A generator that could not be built for this model (held weakly) and these settings, and why."""

    target: weakref.ref
    tokenizer: weakref.ref
    settings: tuple[tuple[str, str], ...]  # and the stamps of the files they name
    message: str


last_reply = LastReply()
_draft = _DraftCache()
_generator = _GeneratorCache()
_cache_lock = threading.RLock()
_noted: set[str] = set()
_cuts = KeptCuts()  # where each recent chat's history was cut (history_in_blocks)


def _note_once(key: str, message: str) -> None:
    """Log ``message`` the first time ``key`` is seen and show it in the panel."""
    last_reply.note = message
    if key not in _noted:
        _noted.add(key)
        logger.warning(message if message.startswith("specdec") else f"specdec: {message}")


# --------------------------------------------------------------------------- params
def apply_overrides(settings: dict[str, Any]) -> None:
    """Take ``specdec-<param>`` values from the webui's settings (settings.yaml), then normalise params.

    The webui does the first part itself before :func:`setup`; doing it again is
    harmless and keeps older webui versions working.
    """
    for name in list(params):
        key = f"{EXTENSION_NAME}-{name}"
        if key in settings:
            params[name] = settings[key]
    normalise_params()


def normalise_params() -> None:
    """Coerce settings.yaml strings to the types the extension uses; reset invalid values."""
    for name in _INT_PARAMS:
        try:
            value = int(params[name])
        except (TypeError, ValueError):
            logger.warning(f"specdec: {name}={params[name]!r} is not an integer; using 0")
            value = 0
        if value < 0:
            logger.warning(f"specdec: {name}={value} is negative; using 0")
            value = 0
        params[name] = value
    for name in _BOOL_PARAMS:
        value = params[name]
        if isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        params[name] = bool(value)
    method = str(params["method"]).strip().lower()
    if method == "auto":
        params["auto_configure"] = True
        method = "prompt_lookup"
    if method not in METHOD_CHOICES:
        logger.warning(
            f"specdec: unknown method {params['method']!r}; using prompt_lookup (choose one of "
            f"{', '.join(METHOD_CHOICES)})"
        )
        method = "prompt_lookup"
    params["method"] = method
    params["draft_model"] = str(params["draft_model"] or NO_DRAFT)
    params["medusa_heads"] = str(params["medusa_heads"] or "")


def setup() -> None:
    """Called by the webui once the extension is imported: read settings, start the release watcher."""
    apply_overrides(getattr(shared, "settings", {}) or {})
    global _watcher
    if _watcher is None:
        _watcher = threading.Thread(target=_watch, name="specdec-release", daemon=True)
        _watcher.start()


_watcher: threading.Thread | None = None


# --------------------------------------------------------------------------- the webui's models folder
def models_dir() -> Path:
    """The webui's models folder (``--model-dir``, by default ``user_data/models``)."""
    args = getattr(shared, "args", None)
    folder = getattr(args, "model_dir", None)
    if folder:
        return Path(folder)
    return Path(getattr(shared, "user_data_dir", "user_data")) / "models"


def list_draft_models() -> list[str]:
    """``"None"`` plus every model folder and ``.gguf`` file in the models folder, sorted."""
    root = models_dir()
    names: list[str] = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and ((entry / "config.json").is_file() or any(entry.glob("*.gguf"))):
                names.append(entry.name)
            elif entry.is_file() and entry.suffix == ".gguf":
                names.append(entry.name)
    return [NO_DRAFT, *sorted(names, key=str.lower)]


def _load_draft(name: str, target: Any) -> tuple[Any, Any]:
    """The draft model ``name`` from the models folder, on the target's device and dtype (cached)."""
    if not name or name == NO_DRAFT:
        return None, None
    device = next(target.parameters()).device
    key = (name, str(target.dtype), str(device))
    with _draft.lock:
        if _draft.key != key:
            from specdec.loading import load_model

            _draft.key = _draft.model = _draft.tokenizer = None
            path = models_dir() / name
            logger.info(f"specdec: loading the draft model {path}")
            last_reply.loading = f"the draft model `{name}`, for this reply" + (
                " (a .gguf file: its first load de-quantizes it, about a minute on a CPU; later loads take seconds)"
                if path.suffix == ".gguf"
                else ""
            )
            try:
                _draft.model, _draft.tokenizer = load_model(str(path), dtype=target.dtype, device=str(device))
            finally:
                last_reply.loading = ""
            _draft.key = key
        return _draft.model, _draft.tokenizer


def _load_medusa(folder: str, target: Any) -> Any:
    """Medusa heads trained for ``target`` (loaded with each new generator, which then keeps them)."""
    from specdec.medusa import MedusaHeads

    return MedusaHeads.from_pretrained(folder, target)


def release(what: str = "all") -> None:
    """Let go of the cached generator (``"generator"``) or of it and the draft model (``"all"``)."""
    with _cache_lock:
        dropped = _generator.generator is not None or (what == "all" and _draft.model is not None)
        _generator.target = _generator.tokenizer = _generator.generator = None
        _generator.key, _generator.choice, _generator.failed = (), "", None
        if what == "all":
            with _draft.lock:
                _draft.key = _draft.model = _draft.tokenizer = None
    if dropped:
        import gc

        gc.collect()


def release_stale() -> None:
    """Release what no longer fits: another or no model loaded, specdec off, or no draft picked."""
    model = getattr(shared, "model", None)
    other_model = _generator.target is not None and _generator.target is not model
    unused_draft = params["draft_model"] == NO_DRAFT and _draft.model is not None
    if not params["enabled"] or other_model or unused_draft:
        release("all")


def _watch(interval: float = 2.0) -> None:
    """Release stale state every ``interval`` seconds (the webui has no hook for unloading a model)."""
    while True:
        time.sleep(interval)
        try:
            release_stale()
        except Exception:  # noqa: BLE001 - the watcher must not die
            logger.exception("specdec: releasing cached state failed")


def _other_extensions_with(*hooks: str) -> list[tuple[Any, str]]:
    """Other active extensions that define any of ``hooks``, as ``(module, name)`` in the webui's order."""
    try:
        from modules import extensions
    except ImportError:
        return []
    return [
        (extension, name)
        for extension, name in extensions.iterator()
        if name != EXTENSION_NAME and any(hasattr(extension, h) for h in hooks)
    ]


def _hooking_extensions() -> list[str]:
    """Other active extensions that change the tokens or logits (specdec would ignore them)."""
    return [name for _, name in _other_extensions_with("tokenizer_modifier", "logits_processor_modifier")]


def _encode(question: str, state: dict[str, Any], tokenizer: Any) -> list[int]:
    """Token ids of the prompt, tokenized and cut from the left as the webui does.

    The webui keeps the last ``truncation_length - max_new_tokens`` tokens
    (Python's ``ids[-n:]``, so 0 keeps all of them); its own ``encode`` is
    used when there is one, so the tokens are those of the extension off.
    """
    max_prompt = int(state.get("truncation_length", 0) or 0) - int(state.get("max_new_tokens", 0) or 0)
    add_bos = bool(state.get("add_bos_token", True))
    try:
        from modules.text_generation import encode as webui_encode
    except ImportError:
        webui_encode = None
    if webui_encode is not None:
        ids = webui_encode(question, add_bos_token=add_bos, truncation_length=max_prompt)
        return [int(t) for t in ids[0]]
    ids = list(tokenizer.encode(str(question), add_special_tokens=True))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        if add_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids.pop(0)
    return ids[-max_prompt:]


def _decode(ids: list[int], state: dict[str, Any], tokenizer: Any) -> str:
    """Reply text of ``ids``, decoded as the webui decodes its own replies."""
    try:
        from modules.text_generation import get_reply_from_output_ids
    except ImportError:
        get_reply_from_output_ids = None
    if get_reply_from_output_ids is not None:
        return get_reply_from_output_ids(ids, state, starting_from=0)
    return tokenizer.decode(ids, skip_special_tokens=bool(state.get("skip_special_tokens", True)))


class ReplyText:
    """The reply text built the way the webui's streaming loop builds it.

    The webui decodes, after each token, the tokens since the text it last
    kept and appends that piece, skipping a piece that holds an incomplete
    character until a later token completes it. Pieces decoded one by one can
    differ from the whole reply decoded at once, so this follows the same steps.
    """

    def __init__(self, state: dict[str, Any], tokenizer: Any) -> None:
        self.state, self.tokenizer = state, tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._start = 0

    def add(self, token: int) -> None:
        """One generated token (not an EOS)."""
        self.ids.append(int(token))
        piece = _decode(self.ids[self._start :], self.state, self.tokenizer)
        if "\ufffd" in piece:
            return
        self.text += piece
        self._start = len(self.ids)


def _should_stop(state: dict[str, Any]) -> bool:
    """The user pressed Stop (``shared.stop_everything``) or the API client went away (``stop_event``)."""
    event = state.get("stop_event")
    return bool(getattr(shared, "stop_everything", False)) or bool(event is not None and event.is_set())


# --------------------------------------------------------------------------- falling back to the webui
def _is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers model run by the webui's Transformers loader."""
    from transformers import PreTrainedModel

    loader = getattr(getattr(shared, "args", None), "loader", None)
    return (
        isinstance(model, PreTrainedModel)
        and loader in (None, "Transformers")
        and not getattr(shared, "is_seq2seq", False)
    )


def webui_generate(request: Request) -> Iterator[str]:
    """The webui's own generation for this call (the function it would use with the extension off)."""
    from modules import text_generation

    if _is_transformers_model(shared.model) or not hasattr(text_generation, "generate_reply_custom"):
        func: Callable[..., Iterator[str]] = text_generation.generate_reply_HF
    else:
        func = text_generation.generate_reply_custom
    if "seed" in inspect.signature(func).parameters:
        yield from func(
            request.question,
            request.original_question,
            request.webui_seed,
            request.state,
            request.stopping_strings,
            is_chat=request.is_chat,
        )
    else:
        yield from func(
            request.question,
            request.original_question,
            request.state,
            request.stopping_strings,
            is_chat=request.is_chat,
        )


def _no_model() -> Iterator[str]:
    """No model is loaded: what the webui does then without the extension (its own message, an empty reply)."""
    try:
        from modules.utils import check_model_loaded
    except ImportError:  # an older webui
        logger.error("No model is loaded. Please select one in the Model tab.")
    else:
        check_model_loaded()
    yield ""


def _fallback(request: Request, key: str, reason: str) -> Iterator[str]:
    _note_once(key, f"{reason}; using the webui's own generation.")
    last_reply.method = "webui"
    yield from webui_generate(request)


# --------------------------------------------------------------------------- generation
def auto_configuration(has_draft: bool) -> tuple[str, str]:
    """The method auto-configure uses, and why (one line for the panel).

    specdec's own ``auto``: the draft picked in the panel, else the Medusa
    heads given, else prompt lookup. Each sizes its candidates per step from
    the costs it measures on this machine and proposes nothing when no
    candidate pays, so a reply that gains nothing from speculation is decoded
    plainly after a few steps instead of paying for rows it does not use.
    """
    if has_draft:
        return (
            "draft",
            f"a draft model ({params['draft_model']}) is picked; candidates per step follow its measured cost",
        )
    heads = params["medusa_heads"]
    if heads and Path(heads).expanduser().is_dir():
        return "medusa", "Medusa heads are given; trees are sized by the measured cost of rows"
    copies = "context copies are verified while their measured cost pays, else the reply is decoded plainly"
    if heads:
        return "prompt_lookup", f"the Medusa heads folder `{heads}` was not found; {copies}"
    return "prompt_lookup", f"no draft model or Medusa heads are picked; {copies}"


def _settings(has_draft: bool) -> tuple[str, int | None, dict[str, Any], str]:
    """Method, draft length, method options and the panel's line for the current params."""
    k = params["num_speculative_tokens"] or None
    if params["auto_configure"]:
        method, why = auto_configuration(has_draft)
        return method, None, {}, f"auto-configure: `{method}` ({why})"
    method, options = params["method"], {}
    if method == "lookahead":
        options = dict(
            window_size=params["window_size"], ngram_size=params["ngram_size"], guess_size=params["guess_size"]
        )
    return method, k, options, f"manual: `{method}`"


def build_generator(target: Any, tokenizer: Any) -> Any:
    """The :class:`specdec.SpeculativeGenerator` for the current params, reused while they and the model stay.

    Built again when the webui loads another model or a setting that shapes
    the generator changes; the draft model is loaded once per name.
    """

    from specdec.errors import SpecdecError

    settings = _build_settings()
    with _cache_lock:
        message = _remembered_failure(target, tokenizer, settings)
        if message is not None:  # noted already: building again would fail the same way (a draft
            raise SpecdecError(message, "")  # load that fails costs its whole load on every reply)
        try:
            return _build_generator(target, tokenizer)
        except Exception as e:
            message = e.message if isinstance(e, SpecdecError) else f"{type(e).__name__}: {e}"
            _generator.failed = _Failure(weakref.ref(target), weakref.ref(tokenizer), settings, message)
            raise


def _build_settings() -> tuple[tuple[str, str], ...]:
    """Every param, and the stamps of the files they name: what a remembered failure is keyed on."""
    return (*sorted((k, repr(v)) for k, v in params.items()), *_files_stamp())


def _remembered_failure(target: Any, tokenizer: Any, settings: tuple[tuple[str, str], ...]) -> str | None:
    """Why the generator for this model and these settings could not be built, if that was tried."""
    failed = _generator.failed
    if failed is None or failed.target() is not target or failed.tokenizer() is not tokenizer:
        return None
    return failed.message if failed.settings == settings else None


def _files_stamp() -> tuple[tuple[str, str], ...]:
    """When the draft model and the Medusa heads named in the settings last changed on disk, so that a failure
    remembered by :func:`build_generator` is tried again once the user has put the right files there."""
    stamps = []
    for name, path in (
        ("draft_model", models_dir() / params["draft_model"] if params["draft_model"] != NO_DRAFT else None),
        ("medusa_heads", Path(params["medusa_heads"]) if params["medusa_heads"] else None),
    ):
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            stat = None
        stamps.append((f"{name}:stamp", repr(stat and (stat.st_mtime_ns, stat.st_size))))
    return tuple(stamps)


def _build_generator(target: Any, tokenizer: Any) -> Any:
    """:func:`build_generator` under its lock, without its memory of failures."""
    from specdec import SpeculativeGenerator

    uses_draft = params["auto_configure"] or params["method"] == "draft"
    draft, draft_tokenizer = _load_draft(params["draft_model"], target) if uses_draft else (None, None)
    method, k, options, choice = _settings(draft is not None)
    key = (
        method,
        k,
        tuple(sorted(options.items())),
        params["draft_model"] if draft is not None else None,
        params["medusa_heads"] if method == "medusa" else None,
        params["static_cache"],
    )
    if (
        _generator.generator is not None
        and _generator.target is target
        and _generator.tokenizer is tokenizer
        and _generator.key == key
    ):
        return _generator.generator
    release("generator")
    if method == "medusa":
        options["medusa_heads"] = _load_medusa(params["medusa_heads"], target) if params["medusa_heads"] else None
    logger.info(f"specdec: building the generator, {choice}")
    generator = SpeculativeGenerator(
        target,
        tokenizer,
        method=method,
        draft=draft if method == "draft" else None,
        num_speculative_tokens=k,
        draft_tokenizer=draft_tokenizer,
        static_cache=None if params["static_cache"] else False,
        **options,
    )
    _generator.target, _generator.tokenizer, _generator.key = target, tokenizer, key
    _generator.generator, _generator.choice = generator, choice
    return generator


def custom_generate_reply(question: str, original_question: str, *args: Any, **kwargs: Any) -> Iterator[str]:
    """The webui's generation hook: yields the cumulative reply text.

    Called as ``(question, original_question, state, stopping_strings=None, is_chat=False)``
    by current webui releases and as ``(question, original_question, seed, state, ...)``
    by older ones.
    """
    try:
        request = parse_call(question, original_question, args, dict(kwargs))
    except Exception as e:  # noqa: BLE001 - a call this adapter cannot read goes to the webui unchanged
        logger.warning(
            "specdec: cannot read this generation call (%s: %s); using the webui's own generation", type(e).__name__, e
        )
        request = None
    if request is None:
        yield from _webui_unparsed(question, original_question, args, kwargs)
        return
    release_stale()
    if not params["enabled"]:
        last_reply.method, last_reply.note = "webui", "specdec is switched off in its panel."
        yield from webui_generate(request)
        return
    model, tokenizer = getattr(shared, "model", None), getattr(shared, "tokenizer", None)
    if model is None:
        yield from _no_model()
        return
    if tokenizer is None:
        yield from webui_generate(request)
        return
    if not _is_transformers_model(model):
        kind = type(model).__name__
        yield from _fallback(request, f"model:{kind}", f"the loaded model ({kind}) is not run by transformers")
        return
    hooks = _hooking_extensions()
    if hooks:
        yield from _fallback(
            request, "hooks:" + ",".join(hooks), f"extension(s) {', '.join(hooks)} change tokens or logits"
        )
        return
    failure: tuple[str, str] | None = None
    try:
        yield from _speculative_reply(request, model, tokenizer)
    except _Unsupported as e:
        failure = (f"unsupported:{e}", f"specdec cannot reproduce {e}")
    except Exception as e:  # noqa: BLE001 - the chat must never break
        from specdec.errors import SpecdecError

        if isinstance(e, SpecdecError):
            # no "specdec: " here: _note_once logs with that prefix, and the panel says who generated the reply
            hint = panel_hint(e)
            failure = (f"error:{e.message}", e.message + (f" ({hint})" if hint else ""))
        else:
            import traceback

            # the text, not exc_info: a log record that keeps the traceback would keep the failed frames alive
            logger.error("specdec: generation failed\n%s", traceback.format_exc())
            failure = (f"crash:{type(e).__name__}", f"specdec failed ({type(e).__name__}: {e})")
    if failure is not None:  # out of the except block: the failed attempt's frames (KV cache...) are gone now
        _release_memory()
        yield from _fallback(request, *failure)


def custom_generate_chat_prompt(user_input: str, state: dict[str, Any], **kwargs: Any) -> Any:
    """The webui's chat-prompt hook: the prompt with old rows dropped in blocks, or None (the webui's own).

    Only with *history_in_blocks* on (and specdec generating for a transformers model). The webui cuts a
    chat that outgrows ``truncation_length - max_new_tokens`` one message at a time, so every reply from
    then on starts its prompt elsewhere and computes it whole. Here, when rows must go, enough go to free
    a quarter of the context (:func:`specdec.history.drop_count`, the rule of ``specdec-local chat``), and
    the chat is cut where it was until it fills the context again, so its KV cache is kept. The prompt is
    the webui's own (``generate_chat_prompt``) for the rows that stay; a row being continued stays.

    The webui calls only the first extension that has this hook; when another active one has it too
    (superbooga, long_replies), its prompt is returned, as the webui would have used it without specdec.
    """
    builders = _other_extensions_with("custom_generate_chat_prompt")
    if builders:
        extension, name = builders[0]
        if params["history_in_blocks"]:
            _note_once(
                f"prompt:{name}", f"the extension {name} builds the chat prompt, so history_in_blocks is not used"
            )
        return extension.custom_generate_chat_prompt(user_input, state, **kwargs)
    if not (params["enabled"] and params["history_in_blocks"]) or not _is_transformers_model(
        getattr(shared, "model", None)
    ):
        return None
    from modules.chat import generate_chat_prompt
    from modules.text_generation import get_encoded_length

    history = kwargs.get("history", state["history"])
    rows = history["internal"]
    whole = {**state, "truncation_length": 2**62}  # rendered without the webui's own cutting, to measure
    context, room = int(state["truncation_length"]), int(state["max_new_tokens"])
    fitting: dict[int, Any] = {}  # prompts measured that fit: the webui's own cutting would not change them

    def length(k: int) -> int:
        prompt = generate_chat_prompt(user_input, whole, **{**kwargs, "history": drop_rows(history, k)})
        tokens = get_encoded_length(prompt[0] if isinstance(prompt, tuple) else prompt)
        if tokens <= context - room:
            fitting[k] = prompt
        return tokens

    parts = len(rows) - 1 if kwargs.get("_continue") else len(rows)
    cut = drop_count(length, max(parts, 0), room, context, _cuts.find(rows))
    _cuts.remember(rows, cut)
    if cut in fitting:
        return fitting[cut]
    # even the newest message alone does not fit (or no row was measured): the webui cuts that message itself
    return generate_chat_prompt(user_input, state, **{**kwargs, "history": drop_rows(history, cut)})


def _release_memory() -> None:
    """Collect what the failed attempt left and hand cached CUDA blocks back, so the fallback has the memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _webui_unparsed(
    question: str, original_question: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[str]:
    """The webui's own generation, given the call exactly as the webui made it."""
    from modules import text_generation

    func = (
        text_generation.generate_reply_HF
        if _is_transformers_model(getattr(shared, "model", None))
        or not hasattr(text_generation, "generate_reply_custom")
        else text_generation.generate_reply_custom
    )
    yield from func(question, original_question, *args, **kwargs)


class _Unsupported(Exception):
    """Settings that specdec cannot reproduce exactly."""


def _speculative_reply(request: Request, model: Any, tokenizer: Any) -> Iterator[str]:
    """The reply by speculative decoding, built from the same inputs the webui gives transformers."""
    state = request.state
    prompt_ids = _encode(request.question, state, tokenizer)
    max_new = new_tokens_limit(state, len(prompt_ids))
    eos = webui_eos_ids(tokenizer)
    problems = unsupported_settings(state, len(prompt_ids) + max_new) + generation_config_problems(model)
    visible = visible_prompt(prompt_ids, model, eos)
    sampling = sampling_arguments(state)
    penalized = sampling["repetition_penalty"] != 1.0  # it counts masked tokens too
    if visible is None or (len(visible) < len(prompt_ids) and penalized):
        problems.append(
            f"a prompt holding pad_token_id {model.generation_config.pad_token_id}, which transformers masks out "
            f"(the webui passes EOS {eos} and no attention mask), "
            + ("as its last token" if visible is None else "with a repetition_penalty, which still counts it")
        )
    generator = build_generator(model, tokenizer)
    if max_new < 1 or len(prompt_ids) + max_new > generator.context_length:
        problems.append(
            f"a reply past the model's context ({len(prompt_ids)} prompt tokens + max_new_tokens "
            f"{max_new} > {generator.context_length})"
        )
    if problems:
        raise _Unsupported(", ".join(problems))

    seed = request.webui_seed
    if seed == -1:
        seed = random.randint(1, 2**31)
    stops = stop_strings(request)
    streaming = bool(state.get("stream", True))
    reply = ReplyText(state, tokenizer)
    every_id: list[int] = []  # the EOS too: the webui decodes it when not streaming
    last_reply.note = ""
    if not request.is_chat:
        yield ""
    stream = generator.stream(
        visible,  # not None: refused above
        max_new_tokens=max_new,
        **sampling,
        seed=seed,
        eos_token_id=eos,
        suppress_tokens=token_bans(state, tokenizer, model),
    )
    event = None
    finish = ""
    try:
        for event in stream:
            every_id.extend(event.token_ids)
            for t in event.token_ids:
                if t not in eos:
                    reply.add(t)
            text = reply.text if streaming else _decode(every_id, state, tokenizer)
            text, hit = cut_at_stop(text, stops)
            if hit:
                finish = "stop"
            if streaming or hit or event.done:
                yield text
            if hit:
                break
            if _should_stop(state):
                break
    finally:
        stream.close()
        if event is not None:
            _record(event.stats, finish or event.finish_reason or "stopped", len(prompt_ids), seed)
            last_reply.advice = _limit_advice(event.stats, state)


def _limit_advice(stats: Any, state: dict[str, Any]) -> str:
    """A line for the panel when a chat near its truncation length computed its whole prompt again."""
    room = int(state.get("truncation_length", 0) or 0) - int(state.get("max_new_tokens", 0) or 0)
    history = state.get("history") or {}
    if (
        params["history_in_blocks"]
        or not history.get("internal")
        or room <= 0
        or stats.prompt_tokens < NEAR_LIMIT * room
        or stats.cached_tokens >= stats.prompt_tokens // 2
    ):
        return ""
    return (
        f"This chat is near its truncation length ({room} tokens for the prompt), and this reply computed its "
        "whole prompt again: once the webui cuts a chat's beginning, one message per reply, every reply does. "
        f"*{HISTORY_IN_BLOCKS_LABEL}* drops a quarter of the context at a time instead and keeps the cache."
    )


NEAR_LIMIT = 0.75
"""Share of the prompt's room from which a chat is near its truncation length (for the panel's advice)."""


def _record(stats: Any, finish: str, context: int, seed: int) -> None:
    """Keep the stats of the reply for the panel and log them like the webui does."""
    last_reply.method = stats.method
    last_reply.choice = _generator.choice
    last_reply.tokens_per_second = stats.tokens_per_second
    last_reply.mean_accepted_length = stats.mean_accepted_length
    last_reply.acceptance_rate = stats.acceptance_rate
    last_reply.new_tokens = stats.new_tokens
    last_reply.seconds = stats.seconds
    last_reply.prompt_tokens = stats.prompt_tokens
    last_reply.cached_tokens = stats.cached_tokens
    last_reply.capture_seconds = stats.graph_capture_seconds
    last_reply.finish_reason = finish
    logger.info(
        f"specdec: output generated in {stats.seconds:.2f} seconds ({stats.tokens_per_second:.2f} tokens/s, "
        f"{stats.new_tokens} tokens, context {context}, {stats.cached_tokens} kept from the reply before, "
        f"seed {seed}), method {stats.method}, "
        f"mean accepted length {stats.mean_accepted_length:.2f}, acceptance rate {stats.acceptance_rate:.0%}"
    )


# --------------------------------------------------------------------------- the panel
def ui() -> None:
    """The extension's panel: settings, a draft-model picker, the method in use and the stats of the last reply."""
    import gradio as gr

    def setter(name: str) -> Callable[[Any], None]:
        def update(value: Any) -> None:
            params[name] = value
            normalise_params()
            release_stale()

        return update

    with gr.Accordion(params["display_name"], open=True):
        gr.Markdown(
            "Lossless speculative decoding for models loaded with the **Transformers** loader: "
            "the same text, fewer slow steps. Other loaders use the webui's own generation."
        )
        with gr.Row():
            enabled = gr.Checkbox(value=params["enabled"], label="Enable specdec")
            auto = gr.Checkbox(
                value=params["auto_configure"], label="Auto-configure (pick the method and draft length)"
            )
        with gr.Row():
            method = gr.Dropdown(
                choices=list(METHOD_CHOICES),
                value=params["method"],
                label=method_label(),
                interactive=not params["auto_configure"],
            )
            k = gr.Slider(
                0,
                16,
                step=1,
                value=params["num_speculative_tokens"],
                label="Speculative tokens per step (0 = adaptive)",
                interactive=not params["auto_configure"],
            )
        in_use = gr.Markdown(method_in_use)
        with gr.Row():
            draft = gr.Dropdown(
                choices=list_draft_models(),
                value=params["draft_model"],
                label="Draft model (from the models folder; same tokenizer as the loaded model)",
            )
            refresh = gr.Button("Refresh list", elem_classes="refresh-button", scale=0, min_width=120)
        with gr.Accordion("Lookahead and Medusa", open=False):
            with gr.Row():
                window = gr.Slider(1, 16, step=1, value=params["window_size"], label="Lookahead window W")
                ngram = gr.Slider(2, 8, step=1, value=params["ngram_size"], label="Lookahead n-gram N")
                guess = gr.Slider(1, 16, step=1, value=params["guess_size"], label="Lookahead guesses G")
            medusa = gr.Textbox(value=params["medusa_heads"], label="Medusa heads folder")
        with gr.Row():
            static = gr.Checkbox(
                value=params["static_cache"],
                label=STATIC_CACHE_LABEL,
                info="CUDA only: a preallocated KV cache, each step replayed as a CUDA graph; no effect elsewhere",
            )
            blocks = gr.Checkbox(
                value=params["history_in_blocks"],
                label=HISTORY_IN_BLOCKS_LABEL,
                info="later replies keep the KV cache; the model sees less history than the webui would give it",
            )
        with gr.Row():
            stats = gr.Markdown(last_reply.markdown)
            show = gr.Button("Refresh stats", elem_classes="refresh-button", scale=0, min_width=120)
    controls = (enabled, auto, method, k, draft, window, ngram, guess, medusa, static, blocks)  # as PANEL_PARAMS
    interface = (getattr(shared, "gradio", None) or {}).get("interface")
    if interface is not None:
        # params are one per server, shared by every browser tab, while the controls were built with the
        # values of server start: a reload or a second tab showed those (auto-configure on, prompt_lookup)
        # while specdec used what another tab had set. Each page load now shows params as they are.
        def current() -> tuple[Any, ...]:
            now = panel_state()
            return (
                now["enabled"],
                now["auto_configure"],
                gr.update(value=now["method"], interactive=now["manual"], label=now["method_label"]),
                gr.update(value=now["num_speculative_tokens"], interactive=now["manual"]),
                gr.update(value=now["draft_model"], choices=now["draft_choices"]),
                *(now[name] for name in PANEL_PARAMS[5:]),  # lookahead sizes, Medusa folder, the two switches
                now["in_use"],
                now["stats"],
            )

        interface.load(
            current,
            None,
            [*controls, in_use, stats],
            show_progress="hidden",
        )
        # The webui has no hook at the end of a reply, so the stats line kept showing the reply before (or
        # "No reply generated with specdec yet") until "Refresh stats" was pressed: poll the last reply's
        # stats (a short string) every 2 s without a progress overlay. The button stays, for at once.
        interface.load(last_reply.markdown, None, stats, every=STATS_EVERY_S, show_progress="hidden")

    for control, name in zip(controls, PANEL_PARAMS):
        control.change(setter(name), control, None).then(method_in_use, None, in_use)
    # the label from the checkbox's value, not from params: the setter above is another listener of the
    # same change and may not have run yet (seen in the UI: a stale label after 2 of 10 toggles)
    auto.change(
        lambda on: (gr.update(interactive=not on, label=method_label(on)), gr.update(interactive=not on)),
        auto,
        [method, k],
    )
    refresh.click(lambda: gr.update(choices=list_draft_models()), None, draft)
    show.click(lambda: (last_reply.markdown(), method_in_use()), None, [stats, in_use])


STATS_EVERY_S = 2.0  # how often the panel's stats line follows the last reply
PANEL_PARAMS = (
    *("enabled", "auto_configure", "method", "num_speculative_tokens", "draft_model"),
    *("window_size", "ngram_size", "guess_size", "medusa_heads", "static_cache", "history_in_blocks"),
)
"""The params the panel's controls set, in the order of its controls."""


def panel_state() -> dict[str, Any]:
    """What the panel shows now: each control's value as ``params`` holds it, the draft models to
    pick from (the one set, even when no longer in the folder), the method selector's label and
    whether it can be used, the "In use" line and the last reply's stats."""
    drafts = list_draft_models()
    if params["draft_model"] not in drafts:
        drafts.append(params["draft_model"])
    return {
        **{name: params[name] for name in PANEL_PARAMS},
        "draft_choices": drafts,
        "method_label": method_label(),
        "manual": not params["auto_configure"],
        "in_use": method_in_use(),
        "stats": last_reply.markdown(),
    }


def method_label(auto_configure: bool | None = None) -> str:
    """The manual method selector's label: it says when auto-configure (by default ``params``') overrides it."""
    if params["auto_configure"] if auto_configure is None else auto_configure:
        return "Method (ignored while auto-configure is on)"
    return "Method"


def method_in_use() -> str:
    """One line for the panel: the method the next reply uses and why."""
    if not params["enabled"]:
        return "**In use:** the webui's own generation (specdec is off)."
    heads = params["medusa_heads"]
    if params["auto_configure"]:
        method, why = auto_configuration(params["draft_model"] != NO_DRAFT)
        chosen = f"chosen by auto-configure: {why}"
    else:
        method, chosen = params["method"], "chosen by hand"
        if method == "draft" and params["draft_model"] == NO_DRAFT:
            return (
                "**In use:** the webui's own generation: the method `draft` needs a draft model; "
                "pick one under *Draft model* (or another method)."
            )
        if method == "medusa" and not heads:
            return (
                "**In use:** the webui's own generation: the method `medusa` needs Medusa heads; "
                "give their folder under *Lookahead and Medusa* (or pick another method)."
            )
    if method == "medusa" and not Path(heads).expanduser().is_dir():
        return (
            f"**In use:** the webui's own generation: the Medusa heads folder `{heads}` was not found; "
            "give the folder `specdec-local train-medusa` wrote (or pick another method)."
        )
    failure = _remembered_failure(getattr(shared, "model", None), getattr(shared, "tokenizer", None), _build_settings())
    if failure is not None:  # known only once a reply tried: a draft or heads folder that does not load
        return f"**In use:** the webui's own generation: {failure}"
    return f"**In use:** `{method}`, {chosen}."
