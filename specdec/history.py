"""Fitting a conversation to the model's context: the oldest exchanges leave, with headroom.

Used by ``specdec-local chat`` and, with ``serve --fit-context``, by the API server. A drop changes the
conversation's start, so the turn that drops computes all of it again (on a CPU, seconds per thousand tokens);
dropping only what the next reply needs would do that at every turn from then on. Once something must go,
enough goes to free :data:`HEADROOM` of the context, and the turns after keep their KV cache until the
conversation fills it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ContextLengthError
from .kvcache import CONVERSATIONS

if TYPE_CHECKING:
    from .engine import SpeculativeGenerator

Messages = list[dict[str, str]]

HEADROOM = 0.25
"""Share of the context freed beyond the reply's budget when exchanges must leave."""


def opening(messages: Messages) -> int:
    """How many messages open ``messages`` and always stay: 1 for a system message, else 0."""
    return 1 if messages and messages[0]["role"] == "system" else 0


def drop_count(length: Callable[[int], int], parts: int, room: int, context: int, cut: int = 0) -> int:
    """How many of a conversation's ``parts`` (its oldest exchanges first) to drop so the reply has room.

    ``length(k)``: the prompt's tokens with the first ``k`` parts dropped (falling as ``k`` grows). ``cut``
    (where the turn before was cut) is kept while ``room`` tokens of the ``context`` stay free, so the
    prompt starts where it did and its KV cache is reused; once more must go, the fewest that also leave
    :data:`HEADROOM` of the context free; all of them when none does. Searched by bisection: ``length``
    is called about log2(parts) times.
    """
    cut = max(0, min(cut, parts))
    if cut == parts or context - length(cut) >= room:
        return cut
    want = room + int(HEADROOM * context)
    low, high = cut + 1, parts  # the answer lies in [low, high]; parts when none leaves ``want``
    while low < high:
        mid = (low + high) // 2
        if context - length(mid) >= want:
            high = mid
        else:
            low = mid + 1
    return low


def fit_history(
    gen: SpeculativeGenerator, messages: Messages, max_new_tokens: int, cut: int = 0
) -> tuple[list[int], int, int]:
    """Drop the oldest exchanges of ``messages`` (in place) until the prompt leaves room for the reply.

    ``messages``: an optional system message, then the conversation, ending with the new message. An
    exchange is a user message and the messages after it up to the next user message; the oldest goes
    first, the system message and the new message stay. Once one must go, more go until :data:`HEADROOM`
    of the context is free beyond the reply's budget (:func:`drop_count`). ``cut``: messages after the
    system message to drop first (where the turn before was cut, so its KV cache is reused).

    Returns the prompt ids, the reply's token budget (``max_new_tokens``, less when even the newest
    message alone leaves less room) and how many exchanges were dropped beyond ``cut``.

    Raises:
        ContextLengthError: the newest message alone fills the context (``messages`` are left as they were:
            a chat that refuses one message keeps its conversation).
    """
    first = opening(messages)
    whole = messages[:first] + messages[first + max(0, min(cut, len(messages) - first - 1)) :]
    last = len(whole) - 1  # the new message
    # where each droppable exchange ends: at the next user message, the last one at the new message
    ends = [i for i in range(first + 1, last) if whole[i]["role"] == "user"] + [last] if last > first else []

    def kept(k: int) -> Messages:
        return whole[:first] + whole[ends[k - 1] if k else first :]

    encoded: dict[int, list[int]] = {}  # the prompts measured, by parts dropped

    def length(k: int) -> int:
        encoded[k] = gen.encode(kept(k))
        return len(encoded[k])

    dropped = drop_count(length, len(ends), max_new_tokens, gen.context_length)
    fitted = kept(dropped)
    ids = encoded[dropped] if dropped in encoded else gen.encode(fitted)
    room = gen.context_length - len(ids)
    if room < 1:
        raise ContextLengthError(
            f"the message alone ({len(ids)} tokens with the template) fills the model's context of "
            f"{gen.context_length} tokens",
            "send a shorter message",
        )
    messages[:] = fitted
    return ids, min(room, max_new_tokens), dropped


class KeptCuts:
    """Where conversations were cut, kept from request to request.

    A client resends the whole conversation every turn; cutting it where its turn before was cut keeps the
    prompt's start (and so its KV cache) until more must go. One cut is kept per conversation, for the
    last :data:`~specdec.kvcache.CONVERSATIONS` conversations (a chat UI's title or follow-up requests
    between turns, or another chat, must not make it forget), each as a fingerprint of what it dropped.
    """

    def __init__(self, size: int = CONVERSATIONS) -> None:
        self.size = size
        self._cuts: list[tuple[str, int]] = []  # (fingerprint of the dropped items, how many), oldest first

    def find(self, items: Sequence[Any]) -> int:
        """The largest kept cut whose dropped items ``items`` begin with, else 0."""
        return max((n for digest, n in self._cuts if n <= len(items) and _digest(items[:n]) == digest), default=0)

    def remember(self, items: Sequence[Any], cut: int) -> None:
        """``items``' first ``cut`` were dropped (nothing is kept for 0)."""
        if cut <= 0:
            return
        same = [c for c in self._cuts if c[1] <= cut and _digest(items[: c[1]]) == c[0]]  # its older cuts
        self._cuts = [c for c in self._cuts if c not in same][-(self.size - 1) :] + [(_digest(items[:cut]), cut)]


def _digest(items: Sequence[Any]) -> str:
    """A fingerprint of ``items`` (JSON-like values)."""
    return hashlib.sha256(json.dumps(list(items), sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
