"""Copies from the context: an index of its n-grams, and copies sized by how far a match agrees.

:class:`NgramIndex` maps every n-gram (``min_n <= n <= max_n``) of the
committed tokens to the positions right after its latest occurrences that have
a continuation, so a lookup costs one dict access per n instead of a rescan of
the context; longer matches are tried first. Prompt lookup proposes its
continuations; the draft method proposes them before running the draft and
checks them in the draft's own forwards; lookahead and Medusa verify them
beside their own candidates (:class:`ContextCopies`).

A copy is sized by how far the match agrees (:func:`copy_length`): measured on
the target's greedy outputs of the shared prompts (qwen-coder-1.5b), a copy
whose context agrees for only its one matched token kept ~0.4 tokens on
average on code and chat (~0.9 when two agree), while one that agrees for
three or more kept 6-13 tokens on the edit prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SHORT_COPY = 2  # most tokens copied after a match that agrees for one token only
LONG_COPY = 10  # fewest tokens copied after a match that agrees for LONG_AGREEMENT tokens or more
LONG_AGREEMENT = 3
AGREEMENT_CAP = 16  # the backward comparison stops here


def copy_length(length: int, agreement: int) -> int:
    """Tokens to copy after a match, from the adaptive ``length`` and how far the match agrees.

    ``agreement`` counts the matched n-gram plus the tokens before it that also
    agree with the text before the occurrence. A lone one-token match rarely
    starts a long copy (at most ``SHORT_COPY``); a match agreeing for
    ``LONG_AGREEMENT`` tokens or more usually sits inside copied text (at least
    ``LONG_COPY``, as after a rejected edit the copy resumes).
    """
    if agreement <= 1:
        return min(length, SHORT_COPY)
    if agreement >= LONG_AGREEMENT:
        return max(length, LONG_COPY)
    return length


class NgramIndex:
    """n-gram -> positions after its latest occurrences, over a growing token list.

    An n-gram ending at position ``e`` is indexed only once ``e + 1`` exists,
    so a lookup of the current suffix finds an earlier occurrence with at
    least one token to copy. The ``keep`` latest occurrences of each n-gram
    are remembered, so a lookup can offer alternatives when the context
    continued differently at different places.
    """

    def __init__(self, min_n: int, max_n: int, keep: int = 4) -> None:
        self.min_n, self.max_n, self.keep = min_n, max_n, keep
        self.tokens: list[int] = []
        self.table: dict[tuple[int, ...], list[int]] = {}
        self._indexed = 0  # n-grams ending before this position are in the table

    def extend(self, new_tokens: list[int]) -> None:
        self.tokens.extend(new_tokens)
        toks, end = self.tokens, len(self.tokens) - 1  # an n-gram may end at most at len - 2
        for e in range(self._indexed, end):
            for n in range(self.min_n, self.max_n + 1):
                if e - n + 1 < 0:
                    break
                starts = self.table.setdefault(tuple(toks[e - n + 1 : e + 1]), [])
                starts.append(e + 1)
                if len(starts) > self.keep:
                    del starts[0]
        self._indexed = max(self._indexed, end)

    def lookup(self, k: int) -> list[int]:
        """Up to ``k`` tokens following the latest earlier occurrence of the longest matching suffix."""
        found = self.lookup_many(k, 1)
        return found[0] if found else []

    def agreement(self, start: int, tail: Sequence[int]) -> int:
        """How many tokens before position ``start`` equal the end of ``tail`` (at most ``AGREEMENT_CAP``)."""
        before = self.tokens[max(start - AGREEMENT_CAP, 0) : start]
        return common_prefix(before[::-1], tail[-AGREEMENT_CAP:][::-1])

    def lookup_many(
        self,
        k: int,
        branches: int,
        branch_tokens: int = 4,
        suffix: Sequence[int] | None = None,
        min_n: int | None = None,
        limit: int | None = None,
    ) -> list[list[int]]:
        """Up to ``branches`` continuations of the current suffix, each starting with a different token.

        The first is :meth:`lookup`'s (``k`` tokens); the others (at most
        ``branch_tokens`` each) follow other occurrences, latest first, of the
        longest suffix and then of shorter ones. ``suffix`` (default: the
        indexed tokens) is the text whose end is matched, e.g. the committed
        tokens plus some drafted ones; ``min_n`` raises the shortest match.
        With ``limit``, the first continuation's length is :func:`copy_length`
        of ``k`` and the match's :meth:`agreement`, at most ``limit``.
        """
        toks = self.tokens
        tail = toks if suffix is None else suffix
        found: list[list[int]] = []
        firsts: set[int] = set()
        for n in range(min(self.max_n, len(tail)), max(self.min_n, min_n or 0) - 1, -1):
            for start in reversed(self.table.get(tuple(tail[-n:]), ())):
                if toks[start] in firsts:
                    continue
                firsts.add(toks[start])
                if found:
                    length = min(k, branch_tokens)
                elif limit is not None:
                    length = min(copy_length(k, self.agreement(start, tail)), limit)
                else:
                    length = k
                found.append(toks[start : start + length])
                if len(found) >= branches:
                    return found
        return found


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def next_copy_length(copy: Sequence[int], new_tokens: Sequence[int], length: int, longest: int) -> int:
    """Twice the copied tokens that were kept (so a fully kept copy doubles), at least 2, at most ``longest``."""
    kept = common_prefix(copy, new_tokens)
    grown = 2 * kept if kept else length // 2
    return max(2, min(longest, grown))


COPY_MAX_NGRAM = 3  # longest context suffix matched for a copy
COPY_START = 8  # length of the first copy of a generation
COPY_BRANCHES = 2  # continuations of different earlier occurrences (the second one short)
COPY_HOT = 4  # a copy that kept this many tokens makes the next step a copy step


class ContextCopies:
    """Context copies verified beside another proposer's candidates (lookahead, Medusa).

    Each step offers the continuations of the latest earlier occurrences of
    the current suffix (``branches`` of them, starting with different tokens;
    :meth:`NgramIndex.lookup_many`). The first is sized by :func:`copy_length`
    from a length that doubles while copies are kept and shrinks when they are
    not (:func:`next_copy_length`, ``longest`` at most), and from how far the
    match agrees with the text before it. After a step whose first copy kept
    ``hot_tokens`` tokens (or all of it) the copies are *hot*: text is being
    copied, and the host proposer may leave out its own rows to make the step
    cheaper.
    """

    def __init__(
        self,
        longest: int,
        min_n: int = 1,
        max_n: int = COPY_MAX_NGRAM,
        start: int = COPY_START,
        branches: int = COPY_BRANCHES,
        hot_tokens: int = COPY_HOT,
    ) -> None:
        self.longest, self.min_n, self.max_n = longest, min(min_n, max_n), max_n
        self.start, self.branches, self.hot_tokens = start, branches, hot_tokens
        self.index = NgramIndex(self.min_n, self.max_n)
        self.length = min(start, longest)  # tokens the next first copy may have
        self.current: list[int] = []  # the first copy proposed this step
        self.hot = False  # the last step's copy kept hot_tokens tokens (or all of it)

    def reset(self, prompt: list[int]) -> None:
        self.index = NgramIndex(self.min_n, self.max_n)
        self.index.extend(prompt)
        self.length = min(self.start, self.longest)
        self.current = []
        self.hot = False

    def propose(self, max_depth: int) -> list[list[int]]:
        """The copies of this step (first one first), none longer than ``max_depth``."""
        found = self.index.lookup_many(min(self.length, max_depth), self.branches, limit=max_depth)
        self.current = found[0] if found else []
        return found

    def observe(self, tokens: torch.Tensor, new_tokens: list[int]) -> None:
        """Index the committed tokens not seen yet; size the next copy from what the step kept.

        Args:
            tokens: ``[L]`` every committed token; new_tokens: the step's new tokens.
        """
        self.index.extend(tokens[len(self.index.tokens) :].tolist())
        if self.current:
            self.hot = common_prefix(self.current, new_tokens) >= min(self.hot_tokens, len(self.current))
            self.length = next_copy_length(self.current, new_tokens, self.length, self.longest)
        else:
            self.hot = False
