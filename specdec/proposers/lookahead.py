"""Method ``lookahead``: the target guesses its own future by Jacobi iteration.

Lookahead decoding (Fu et al., ICML 2024) needs no draft model. Each step's
single target forward carries, besides the pending token (the root):

- the *verification branch*: up to ``G`` candidate n-grams from the
  :class:`NgramPool` whose first token is the pending token, sent as a trie
  (shared prefixes merged, so siblings are distinct tokens) and verified by
  the engine's one verifier (greedy, or lossless recursive rejection over
  point-mass siblings when sampling);
- the *lookahead branch*: a :class:`JacobiWindow` of ``N-1`` levels x ``W``
  columns, sent as extra rows. Window token ``(level l, column w)`` sits at
  position ``l + w + 1`` after the root and attends to the cache, the root,
  level 0 up to column ``w`` and its own column up to level ``l``: an
  ordinary causal prefix of length ``l + w + 1``. The two branches never see
  each other.

After the step, the argmax of the last level's rows becomes a new level (the
oldest is dropped), and each column read top to bottom plus its new token is
an n-gram for the pool. The pool is also seeded with the prompt's n-grams and
fed the n-grams of every committed token. Rejected candidates and the window
never reach the KV cache (the engine keeps only the accepted rows).

Pool n-grams are only ``N-1`` tokens long, so on text that repeats its
context (edits, summaries) a step gains at most ``N`` tokens. A *context
copy* fixes that: the tokens that followed the latest earlier occurrences of
the current suffix (as in prompt lookup; ``COPY_BRANCHES`` of them, starting
with different tokens) are verified as more candidates in the same trie, with a length that doubles while copies are accepted and
shrinks when they are not (``copy_tokens`` at most; 0 turns copies off), and
that follows how far the match agrees with the text before it
(:func:`~specdec.ngrams.copy_length`; constants and state in
:class:`~specdec.ngrams.ContextCopies`).
While copies are being kept (the last kept ``COPY_HOT`` tokens or all of
it), a step sends the candidates without the window's rows, which makes it
cheaper; the window waits and resumes when a copy fails.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..errors import UnsupportedModelError
from ..ngrams import ContextCopies
from ..tree import build_trie
from .base import DecodeState, Proposal, StepOutcome
from .options import LookaheadOptions


# attention implementations that take a custom 4D float mask through the public forward
MASKABLE_ATTENTION = ("sdpa", "eager")


class NgramPool:
    """n-grams keyed by their first token; at most ``capacity`` per key, least recently added evicted.

    An n-gram is stored as its continuation, a tuple of ``ngram_size - 1``
    tokens. Adding an n-gram already present makes it the most recent.
    """

    def __init__(self, ngram_size: int, capacity: int) -> None:
        self.ngram_size = ngram_size
        self.capacity = capacity
        self.table: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, ngram: Sequence[int]) -> None:
        """Insert one n-gram of exactly ``ngram_size`` tokens."""
        key, cont = int(ngram[0]), tuple(int(t) for t in ngram[1:])
        entries = self.table.setdefault(key, OrderedDict())
        if cont in entries:
            entries.move_to_end(cont)
            return
        entries[cont] = None
        if len(entries) > self.capacity:
            entries.popitem(last=False)

    def add_sequence(self, tokens: Sequence[int], start: int = 0) -> int:
        """Insert every n-gram of ``tokens`` beginning at index ``>= start``, in order.

        Returns the first start index not yet inserted (pass it back as ``start``
        once ``tokens`` has grown).
        """
        n = self.ngram_size
        last = len(tokens) - n  # last start with a full n-gram
        for i in range(start, last + 1):
            self.add(tokens[i : i + n])
        return max(start, last + 1)

    def candidates(self, key: int) -> list[tuple[int, ...]]:
        """Continuations of ``key``, most recent first."""
        entries = self.table.get(int(key))
        return list(reversed(entries)) if entries else []

    def __len__(self) -> int:
        return sum(len(v) for v in self.table.values())


class JacobiWindow:
    """The lookahead branch: up to ``N-1`` levels of ``W`` tokens, ``levels[0]`` the oldest.

    It starts with one level and grows by one level per step until it has
    ``N-1``; from then on every step drops the oldest level and yields ``W``
    n-grams (one per column).
    """

    def __init__(self, first_level: Sequence[int], ngram_size: int) -> None:
        self.width = len(first_level)
        self.max_levels = ngram_size - 1
        self.levels: list[list[int]] = [list(first_level)]

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def tokens(self) -> list[int]:
        """The window's tokens, level-major (row ``l*W + w`` is level ``l``, column ``w``)."""
        return [t for level in self.levels for t in level]

    def advance(self, new_level: Sequence[int]) -> list[list[int]]:
        """Add the next level (the argmax of the last level's rows); return the finished n-grams.

        Args:
            new_level: ``W`` tokens, the target's prediction after each column's last token.
        Returns:
            ``W`` n-grams of ``N`` tokens when the window was full, else ``[]``.
        """
        new_level = [int(t) for t in new_level]
        if len(self.levels) < self.max_levels:
            self.levels.append(new_level)
            return []
        ngrams = [[level[w] for level in self.levels] + [new_level[w]] for w in range(self.width)]
        self.levels = self.levels[1:] + [new_level]
        return ngrams


def window_layout(window_size: int, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention of the window rows, with no candidate nodes in the forward.

    Row ``l*W + w`` holds level ``l``, column ``w``. It sits at offset
    ``l + w + 1`` from the root and attends to the root, to level 0 at
    columns ``<= w`` and to column ``w`` at levels ``<= l``.

    Returns:
        positions: ``[m]`` long, offsets from the root's position (``m = L*W``).
        allowed: ``[m, 1+m]`` bool, column 0 the root, column ``1+r`` window row ``r``.
    """
    W, L = window_size, num_levels
    m = W * L
    level = torch.arange(m) // W
    column = torch.arange(m) % W
    positions = level + column + 1
    allowed = torch.zeros(m, 1 + m, dtype=torch.bool)
    allowed[:, 0] = True
    # level 0 causally, up to the row's own column
    allowed[:, 1 : 1 + W] = column[:W][None, :] <= column[:, None]
    # the row's own column at the levels up to its own
    same_column = column[None, :] == column[:, None]
    not_later = level[None, :] <= level[:, None]
    allowed[:, 1:] |= same_column & not_later
    return positions, allowed


def check_model(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` when ``model``'s attention cannot take a custom 4D mask."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    if impl not in MASKABLE_ATTENTION:
        raise UnsupportedModelError(
            f"lookahead decoding needs attention that accepts a custom 4D mask, but this model uses {impl!r}",
            "load the model with attn_implementation='sdpa' (or 'eager'), or use --method prompt_lookup",
        )


class LookaheadProposer:
    name = "lookahead"

    def __init__(self, cfg: LookaheadOptions) -> None:
        self.cfg = cfg
        self.pool = NgramPool(cfg.ngram_size, cfg.guess_size)
        self.window: JacobiWindow | None = None
        self._indexed = 0  # committed n-grams starting before this index are in the pool
        self._layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.copies: ContextCopies | None = None

    def reset(self, state: DecodeState) -> None:
        cfg = self.cfg
        prompt = state.tokens.tolist()
        self.pool = NgramPool(cfg.ngram_size, cfg.guess_size)
        self._indexed = self.pool.add_sequence(prompt)
        self.copies = None
        if cfg.copy_tokens:
            self.copies = ContextCopies(cfg.copy_tokens, cfg.copy_min_ngram)
            self.copies.reset(prompt)
        # a fixed seed: the same prompt always starts the same window
        picks = torch.randint(len(prompt), (cfg.window_size,), generator=torch.Generator().manual_seed(0))
        self.window = JacobiWindow([prompt[i] for i in picks.tolist()], cfg.ngram_size)

    def _layout(self, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_levels not in self._layouts:
            self._layouts[num_levels] = window_layout(self.cfg.window_size, num_levels)
        return self._layouts[num_levels]

    def propose(self, state: DecodeState, max_nodes: int) -> Proposal:
        """Candidates of the pending token as a trie (depth <= ``max_nodes``) plus the window rows."""
        device = state.tokens.device
        if max_nodes <= 0 or self.window is None:
            return Proposal.empty(device)
        candidates = self.pool.candidates(int(state.tokens[-1]))
        copies = self.copies.propose(max_nodes) if self.copies is not None else []
        candidates = [*copies, *candidates]
        tokens, parents = build_trie(candidates, max_nodes)
        n = len(tokens)
        if copies and self.copies.hot:  # text is being copied: skip the window's rows this step
            return Proposal(
                tokens=torch.tensor(tokens, dtype=torch.long, device=device),
                parents=torch.tensor(parents, dtype=torch.long, device=device),
            )
        positions, allowed = self._layout(self.window.num_levels)
        m = positions.numel()
        extra_mask = torch.zeros(m, 1 + n + m, dtype=torch.bool)
        extra_mask[:, 0] = allowed[:, 0]
        extra_mask[:, 1 + n :] = allowed[:, 1:]
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            parents=torch.tensor(parents, dtype=torch.long, device=device),
            extra_tokens=torch.tensor(self.window.tokens(), dtype=torch.long, device=device),
            extra_positions=positions.to(device),
            extra_mask=extra_mask.to(device),
        )

    def observe(self, outcome: StepOutcome) -> None:
        """Advance the window from its last level's logits; add new n-grams to the pool."""
        draft = outcome.proposal
        if draft.num_extra and self.window is not None:
            W, n = self.cfg.window_size, draft.num_nodes
            last = outcome.logits[1 + n + draft.num_extra - W : 1 + n + draft.num_extra]  # [W, V]
            for ngram in self.window.advance(last.argmax(dim=-1).tolist()):
                self.pool.add(ngram)
        tail = outcome.tokens[self._indexed :].tolist()
        self._indexed += self.pool.add_sequence(tail)
        if self.copies is not None:
            self.copies.observe(outcome.tokens, outcome.new_tokens.tolist())


def build(ctx) -> LookaheadProposer:
    check_model(ctx.target)
    return LookaheadProposer(ctx.options)
