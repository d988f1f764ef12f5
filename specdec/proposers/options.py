"""Each method's options, one validated dataclass per method (defaults defined here once).

A method's options are built from the caller's keyword options for that
method only (:func:`specdec.proposers.method_options`); the proposer factory
receives the object in :attr:`~specdec.proposers.ProposerContext.options`.
This module imports neither torch nor transformers, so front ends (the CLI,
the webui extension) can read the defaults cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SpecdecError

if TYPE_CHECKING:
    from ..medusa.heads import MedusaHeads
    from ..verify import TypicalAcceptance

COPY_TOKENS = 32  # longest context copy a host proposer (lookahead, Medusa) verifies per step


LOOKAHEAD_MAX_ROWS = 256
"""Most rows a lookahead step may send (window and verify branches): the static path's widest bucket."""
DRAFT_TREE_ROWS = 32
"""Rows of a draft tree's target forward (root and nodes) where ``tree_nodes`` is chosen by the device."""


def _check_int(method: str, name: str, value: Any, low: int, hint: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecdecError(f"{method} {name} must be an integer >= {low}, got {value!r}", hint)


def _check_bool(method: str, name: str, value: Any, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise SpecdecError(f"{method} {name} must be True or False{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class NoneOptions:
    """Method ``none`` (plain decoding) has no options."""


@dataclass(frozen=True)
class DraftOptions:
    """Options of method ``draft``.

    Attributes:
        ngram_first: propose n-gram matches from the context before running the draft,
            and let the draft check context copies in its own forwards (greedy).
        ngram_min_tokens: shortest n-gram continuation used instead of the draft.
        ngram_tokens: tokens copied from an n-gram match at first.
        max_copy_tokens: most tokens copied once copies keep being kept whole.
        max_ngram: longest context suffix matched.
        confidence_stop: stop drafting when the draft's probability of its token
            is below this (0 = never stop early).
        int8: run an int8 weight-only copy of the draft (None = wherever the
            kernel runs, i.e. on a CPU).
        tree_nodes: under greedy decoding, verify a tree of this many draft
            tokens per step instead of a chain: the draft's likeliest tokens at
            its likeliest nodes (by path probability), one draft forward per
            depth. None = where a forward over :data:`DRAFT_TREE_ROWS` rows
            costs about one row's (a GPU's prior row costs) a tree of
            ``DRAFT_TREE_ROWS - 1`` nodes, elsewhere a chain; 0 = always a chain.
    """

    ngram_first: bool = True
    ngram_min_tokens: int = 3
    ngram_tokens: int = 10
    max_copy_tokens: int = 32
    max_ngram: int = 3
    confidence_stop: float = 0.3
    int8: bool | None = None
    tree_nodes: int | None = None

    def __post_init__(self) -> None:
        _check_bool("draft", "ngram_first", self.ngram_first)
        _check_bool("draft", "int8", self.int8, allow_none=True)
        if self.tree_nodes is not None:
            _check_int("draft", "tree_nodes", self.tree_nodes, 0, "None chooses by the device, 0 drafts a chain")
            if self.tree_nodes > LOOKAHEAD_MAX_ROWS - 1:
                raise SpecdecError(
                    f"draft tree_nodes must be at most {LOOKAHEAD_MAX_ROWS - 1} (a step's widest bucket), "
                    f"got {self.tree_nodes}"
                )
        for name in ("ngram_min_tokens", "ngram_tokens", "max_copy_tokens", "max_ngram"):
            _check_int("draft", name, getattr(self, name), 1)
        if (
            isinstance(self.confidence_stop, bool)
            or not isinstance(self.confidence_stop, (int, float))
            or not 0.0 <= self.confidence_stop < 1.0
        ):
            raise SpecdecError(f"confidence_stop must be in [0, 1), got {self.confidence_stop!r}")
        if self.ngram_tokens < self.ngram_min_tokens:
            raise SpecdecError("need 1 <= ngram_min_tokens <= ngram_tokens and max_ngram >= 1")


@dataclass(frozen=True)
class PromptLookupOptions:
    """Options of method ``prompt_lookup``.

    Attributes:
        max_ngram: longest suffix matched.
        min_ngram: shortest suffix matched.
        max_copy_tokens: while copies are kept whole, the copy length doubles up to
            this (runs of copied text).
        branches: continuations from different earlier occurrences, each
            starting with a different token, verified together as a tree (the
            latest occurrence's full length, the others ``branch_tokens``); 1 =
            a single chain, as with a fixed ``num_speculative_tokens``.
        branch_tokens: length of the alternative branches.
    """

    max_ngram: int = 3
    min_ngram: int = 1
    max_copy_tokens: int = 32
    branches: int = 3
    branch_tokens: int = 4

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram", "max_copy_tokens", "branches", "branch_tokens"):
            _check_int("prompt_lookup", name, getattr(self, name), 1)
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise SpecdecError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")


@dataclass(frozen=True)
class LookaheadOptions:
    """Options of method ``lookahead``.

    A step forwards ``1 + (N-1)*W`` rows plus at most ``G*(N-1)`` candidate
    nodes (fewer once shared prefixes are merged). On a 2-core CPU in bf16
    (Qwen2.5-Coder-1.5B) a forward over 4 new rows costs what a 1-row one
    does, 8 rows ~1.15x, 16 rows ~1.45x and 32 rows ~2x, so the defaults keep
    the window to one column (W=1: a step of ~5 rows). Measured side by side
    in one process on the shared prompts (128 tokens): W=1 gave 1.07x the
    tokens/s of W=3 and 1.03x that of W=2 (accepted length 1.24-2.61 vs
    1.33-2.72 per step: the extra columns' n-grams were worth less than their
    rows); N=3 vs N=2 or 4 and G=3 vs 2 were within noise. GPUs, where rows are
    nearly free, get wider windows from their hardware profiles.

    Attributes:
        window_size: ``W``, columns of the Jacobi window (parallel guesses).
        ngram_size: ``N``, length of the n-grams (key token + ``N-1`` candidates);
            the window has ``N-1`` levels.
        guess_size: ``G``, most n-grams kept per key and verified per step.
        copy_tokens: longest context copy verified per step (0 = no copies).
        copy_min_ngram: shortest context suffix that must match for a copy.
    """

    window_size: int = 1
    ngram_size: int = 3
    guess_size: int = 3
    copy_tokens: int = COPY_TOKENS
    copy_min_ngram: int = 1

    def __post_init__(self) -> None:
        for name, low in (
            ("window_size", 1),
            ("ngram_size", 2),
            ("guess_size", 1),
            ("copy_tokens", 0),
            ("copy_min_ngram", 1),
        ):
            _check_int("lookahead", name, getattr(self, name), low)
        rows = (self.window_size + self.guess_size) * (self.ngram_size - 1)
        if rows > LOOKAHEAD_MAX_ROWS:
            raise SpecdecError(
                f"lookahead window_size {self.window_size}, ngram_size {self.ngram_size} and guess_size "
                f"{self.guess_size} make steps of about {rows} rows, more than {LOOKAHEAD_MAX_ROWS}: every token "
                "would cost many times a plain step",
                "the widest hardware profile uses window_size 15, ngram_size 5, guess_size 15 (120 rows)",
            )


@dataclass(frozen=True)
class MedusaOptions:
    """Options of method ``medusa``.

    Attributes:
        medusa_heads: the trained heads, or a folder of them (required).
        tree: ``medusa_choices``-style paths (a fixed tree), ``"auto"`` or None for the
            tree stored with the heads (else the CPU default), ``"default"`` for the
            CPU default.
        tree_size: most nodes of the tree (a hardware profile's ``medusa.tree_size``);
            a bigger tree keeps its most probable nodes (None = no cap).
        typical_acceptance: True (or a :class:`~specdec.verify.TypicalAcceptance`) for
            Medusa's LOSSY typical acceptance when sampling; None/False = exact, the
            default. Greedy decoding stays exact either way.
        posterior_threshold: with typical acceptance: hard probability threshold.
        posterior_alpha: with typical acceptance: scale of the entropy threshold.
        copy_tokens: longest context copy verified beside the tree (0 = heads only).
        dynamic_tree: choose each step's tree from the heads' own confidence
            (:meth:`~specdec.medusa.heads.MedusaHeads.dynamic_tree`), at most
            ``tree_size`` nodes; False = the fixed tree; None = per-step unless a
            ``tree`` is given.
        size_by_cost: a per-step tree keeps, each step, as many nodes as maximise the
            expected tokens per unit of forward cost (False = always the most nodes).
    """

    medusa_heads: MedusaHeads | str | os.PathLike[str] | None = None
    tree: Sequence[Sequence[int]] | str | None = None
    tree_size: int | None = None
    typical_acceptance: bool | TypicalAcceptance | None = None
    posterior_threshold: float | None = None
    posterior_alpha: float | None = None
    copy_tokens: int = COPY_TOKENS
    dynamic_tree: bool | None = None
    size_by_cost: bool = True

    def __post_init__(self) -> None:
        for name in ("dynamic_tree", "size_by_cost"):
            _check_bool("medusa", name, getattr(self, name), allow_none=name == "dynamic_tree")
        _check_int("medusa", "copy_tokens", self.copy_tokens, 0, "0 turns copies off")
        if self.tree_size is not None:
            _check_int("medusa", "tree_size", self.tree_size, 1)
        if self.dynamic_tree and self.tree is not None:
            raise SpecdecError(
                "give either a fixed tree or dynamic_tree=True, not both",
                "a dynamic tree is chosen each step; tree_size caps its nodes",
            )

    @property
    def per_step_tree(self) -> bool:
        """Whether each step's tree is chosen from the heads' confidence."""
        return self.dynamic_tree if self.dynamic_tree is not None else self.tree is None


MethodOptions = NoneOptions | DraftOptions | PromptLookupOptions | LookaheadOptions | MedusaOptions

__all__ = [
    "COPY_TOKENS",
    "NoneOptions",
    "DraftOptions",
    "PromptLookupOptions",
    "LookaheadOptions",
    "MedusaOptions",
    "MethodOptions",
]
