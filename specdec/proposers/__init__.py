"""Proposers: one module per method, all behind :class:`~specdec.proposers.base.Proposer`.

:data:`REGISTRY` is the one list of methods: each method's proposer factory and
its options class (:mod:`specdec.proposers.options`). This module imports
neither torch nor transformers, so front ends may read the list cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..errors import ForeignOptionsError, MissingDraftError, SpecdecError, UnknownMethodError
from .options import DraftOptions, LookaheadOptions, MedusaOptions, MethodOptions, NoneOptions, PromptLookupOptions

if TYPE_CHECKING:
    import torch

    from .base import Proposer

AUTO = "auto"


@dataclass(frozen=True)
class MethodEntry:
    """One method: ``factory`` is ``"module:function"``, taking a :class:`ProposerContext` and returning a
    proposer; ``options`` is the class of the method's options."""

    factory: str
    options: type[MethodOptions]


# method name -> its factory and options class
REGISTRY: dict[str, MethodEntry] = {
    "none": MethodEntry("specdec.proposers.none:build", NoneOptions),
    "draft": MethodEntry("specdec.proposers.draft_model:build", DraftOptions),
    "prompt_lookup": MethodEntry("specdec.proposers.prompt_lookup:build", PromptLookupOptions),
    "lookahead": MethodEntry("specdec.proposers.lookahead:build", LookaheadOptions),
    "medusa": MethodEntry("specdec.proposers.medusa:build", MedusaOptions),
}
METHODS: tuple[str, ...] = (*REGISTRY, AUTO)


@dataclass
class ProposerContext:
    """Everything a proposer factory may need; ``options`` is the method's own options object."""

    target: torch.nn.Module
    draft: torch.nn.Module | None = None
    tokenizer: Any = None
    num_speculative_tokens: int | None = None
    options: MethodOptions = field(default_factory=NoneOptions)
    static_cache: bool = False
    compile_steps: bool = False
    prefix_cache: bool = True


def option_names(method: str) -> tuple[str, ...]:
    """The keyword options of ``method``."""
    return tuple(f.name for f in fields(REGISTRY[method].options))


def method_of(options: MethodOptions) -> str:
    """The method an options object belongs to."""
    for name, entry in REGISTRY.items():
        if type(options) is entry.options:
            return name
    raise SpecdecError(
        f"{type(options).__name__} is not the options of any method",
        f"give the options of one of: {', '.join(REGISTRY)}",
    )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UnknownMethodError(f"unknown method {method!r}", f"choose one of: {', '.join(METHODS)}")


def method_options(method: str, given: Mapping[str, Any] | None = None) -> MethodOptions:
    """``method``'s options object from keyword options; a None value means the default.

    A value for an option of another method (or of none) is an error, so a
    setting never goes silently unused.
    """
    _check_method(method)
    if method == AUTO:
        raise SpecdecError(
            "the options of method 'auto' depend on the method it resolves to",
            "resolve the method first (resolve_method)",
        )
    own = option_names(method)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    foreign = [k for k in given if k not in own]
    if foreign:
        owners = {k: [m for m in REGISTRY if k in option_names(m)] for k in foreign}
        raise ForeignOptionsError(
            f"option(s) {', '.join(foreign)} do not apply to method {method!r}",
            f"options of {method!r}: {', '.join(own) or 'none'}; drop the others or choose their method: "
            + ", ".join(f"{k} ({', '.join(ms) or 'no method'})" for k, ms in owners.items()),
            method,
            owners,
        )
    return REGISTRY[method].options(**given)


def resolve_method(method: str, draft: object | None, medusa_heads: bool = False) -> str:
    """The concrete method for ``method`` (``"auto"`` picks one: Medusa when heads are given, else the draft
    when one is given, else prompt lookup)."""
    _check_method(method)
    if method == AUTO:
        if medusa_heads:
            return "medusa"
        return "draft" if draft is not None else "prompt_lookup"
    if method == "draft" and draft is None:
        raise MissingDraftError(
            "method 'draft' needs a draft model", "pass draft= (--draft in the CLI) or use --method prompt_lookup"
        )
    return method


def method_and_options(
    method: str, draft: object | None, options: MethodOptions | None, given: Mapping[str, Any]
) -> tuple[str, MethodOptions]:
    """The concrete method and its options: ``options`` (an options object, whose method is then the
    method) or else the keyword options ``given``, built once ``"auto"`` is resolved.

    ``draft``: the draft model, or its reference before loading (only whether one is given matters).
    """
    if options is not None:
        if any(v is not None for v in given.values()):
            raise SpecdecError(
                f"method options given both as {type(options).__name__} and as keywords "
                f"({', '.join(k for k, v in given.items() if v is not None)})",
                "give them in one place",
            )
        own = method_of(options)
        _check_method(method)
        if method not in (AUTO, own):
            raise SpecdecError(
                f"{type(options).__name__} are the options of method {own!r}, not {method!r}",
                f"pass method={own!r} (or 'auto'), or the options of {method!r}",
            )
        return resolve_method(own, draft), options
    resolved = resolve_method(method, draft, medusa_heads=given.get("medusa_heads") is not None)
    return resolved, method_options(resolved, given)


def build_proposer(method: str, ctx: ProposerContext) -> Proposer:
    module_name, factory = REGISTRY[method].factory.split(":")
    return getattr(importlib.import_module(module_name), factory)(ctx)


__all__ = [
    "AUTO",
    "REGISTRY",
    "METHODS",
    "MethodEntry",
    "MethodOptions",
    "ProposerContext",
    "option_names",
    "method_of",
    "method_options",
    "method_and_options",
    "resolve_method",
    "build_proposer",
    "NoneOptions",
    "DraftOptions",
    "PromptLookupOptions",
    "LookaheadOptions",
    "MedusaOptions",
]
