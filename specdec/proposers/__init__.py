"""Proposers: one module per method, all behind :class:`~specdec.proposers.base.Proposer`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SpecdecError, UnknownMethodError
from .base import DecodeState, Draft, Proposer, StepOutcome

# method name -> "module:factory"; a factory takes a ProposerContext and returns a Proposer.
REGISTRY: dict[str, str] = {
    "none": "specdec.proposers.none:build",
    "draft": "specdec.proposers.draft_model:build",
    "prompt_lookup": "specdec.proposers.prompt_lookup:build",
    "lookahead": "specdec.proposers.lookahead:build",
    "medusa": "specdec.proposers.medusa:build",
}
METHODS: tuple[str, ...] = (*REGISTRY, "auto")


@dataclass
class ProposerContext:
    """Everything a proposer factory may need."""

    target: torch.nn.Module
    draft: torch.nn.Module | None = None
    tokenizer: Any = None
    num_speculative_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    static_cache: bool = False


def resolve_method(method: str, draft: torch.nn.Module | None, options: dict[str, Any]) -> str:
    """The concrete method for ``method`` (``"auto"`` picks one)."""
    if method not in METHODS:
        raise UnknownMethodError(f"unknown method {method!r}", f"choose one of: {', '.join(METHODS)}")
    if method == "auto":
        if options.get("medusa_heads") is not None:
            return "medusa"
        return "draft" if draft is not None else "prompt_lookup"
    if method == "draft" and draft is None:
        raise SpecdecError("method 'draft' needs a draft model", "pass draft= (--draft in the CLI) or use --method prompt_lookup")
    return method


def build_proposer(method: str, ctx: ProposerContext) -> Proposer:
    module_name, factory = REGISTRY[method].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise UnknownMethodError(f"method {method!r} is not available in this version of specdec") from e
        raise
    return getattr(module, factory)(ctx)


def take_options(options: dict[str, Any], names: tuple[str, ...], method: str) -> dict[str, Any]:
    """The options a method knows; a value for an option of another method is ignored only if None."""
    unknown = [k for k, v in options.items() if k not in names and v is not None and k not in _SHARED_OPTIONS]
    if unknown:
        raise SpecdecError(
            f"option(s) {', '.join(unknown)} do not apply to method {method!r}",
            f"options of {method!r}: {', '.join(names) or 'none'}",
        )
    return {k: v for k, v in options.items() if k in names and v is not None}


# options the front ends may always pass (profiles fill them for every method)
_SHARED_OPTIONS = {"window_size", "ngram_size", "guess_size", "max_ngram", "medusa_heads", "tree", "tree_size"}

__all__ = ["Draft", "DecodeState", "StepOutcome", "Proposer", "ProposerContext", "METHODS", "build_proposer", "resolve_method", "take_options"]
