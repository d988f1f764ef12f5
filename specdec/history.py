"""Fitting a conversation to the model's context: the oldest exchanges leave, with headroom.

Used by ``specdec-local chat`` and, with ``serve --fit-context``, by the API server. A drop changes the
conversation's start, so the turn that drops computes all of it again (on a CPU, seconds per thousand tokens);
dropping only what the next reply needs would do that at every turn from then on. Once something must go,
enough goes to free :data:`HEADROOM` of the context, and the turns after keep their KV cache until the
conversation fills it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ContextLengthError

if TYPE_CHECKING:
    from .engine import SpeculativeGenerator

Messages = list[dict[str, str]]

HEADROOM = 0.25
"""Share of the context freed beyond the reply's budget when exchanges must leave."""


def opening(messages: Messages) -> int:
    """How many messages open ``messages`` and always stay: 1 for a system message, else 0."""
    return 1 if messages and messages[0]["role"] == "system" else 0


def fit_history(
    gen: SpeculativeGenerator, messages: Messages, max_new_tokens: int, cut: int = 0
) -> tuple[list[int], int, int]:
    """Drop the oldest exchanges of ``messages`` (in place) until the prompt leaves room for the reply.

    ``messages``: an optional system message, then the conversation, ending with the new message. An
    exchange is a user message and the messages after it up to the next user message; the oldest goes
    first, the system message and the new message stay. Once one must go, more go until :data:`HEADROOM`
    of the context is free beyond the reply's budget. ``cut``: messages after the system message to drop
    first (where the turn before was cut, kept while the reply fits, so its KV cache is reused).

    Returns the prompt ids, the reply's token budget (``max_new_tokens``, less when even the newest
    message alone leaves less room) and how many exchanges were dropped beyond ``cut``.

    Raises:
        ContextLengthError: the newest message alone fills the context.
    """
    first = opening(messages)
    del messages[first : first + max(0, min(cut, len(messages) - first - 1))]
    dropped = 0
    want = max_new_tokens  # the room asked for: the reply's budget, plus the headroom once dropping
    while True:
        ids = gen.encode(messages)
        room = gen.context_length - len(ids)
        if room >= want:
            return ids, max_new_tokens, dropped
        if len(messages) - first < 2:  # only the new message is left
            if room >= 1:
                return ids, min(room, max_new_tokens), dropped
            raise ContextLengthError(
                f"the message alone ({len(ids)} tokens with the template) fills the model's context of "
                f"{gen.context_length} tokens",
                "send a shorter message",
            )
        end = first + 1  # the oldest exchange: its user message and what follows up to the next one
        while end < len(messages) - 1 and messages[end]["role"] != "user":
            end += 1
        del messages[first:end]
        dropped += 1
        want = max_new_tokens + int(HEADROOM * gen.context_length)
