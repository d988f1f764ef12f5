"""Fitting a conversation to the context (:func:`specdec.history.fit_history`), shared by ``chat`` and
``serve --fit-context``: what an exchange is, and a cut given by the turn before."""

from __future__ import annotations

import math
import random

import pytest

import specdec
from specdec.errors import ContextLengthError
from specdec.history import HEADROOM, KeptCuts, drop_count, fit_history


def _turn(role: str, i: int) -> dict[str, str]:
    return {"role": role, "content": f"{role} {i}: " + "some words " * 10}


@pytest.fixture(scope="module")
def gen(smollm2):
    return specdec.SpeculativeGenerator(*smollm2, method="none")


@pytest.mark.real_model
def test_an_exchange_is_a_user_message_and_what_follows_it(gen):
    """Clients may send an assistant message first or two in a row: what is left still starts with a user
    message, after the system message, and the new message stays."""
    messages = [
        {"role": "system", "content": "Be brief."},
        _turn("assistant", 0),  # a greeting before any user message
        _turn("user", 1),
        _turn("assistant", 1),
        _turn("assistant", 2),
        _turn("user", 3),
        _turn("assistant", 3),
        _turn("user", 4),
    ]
    full, context = len(gen.encode(messages)), gen.context_length
    gen.context_length = full  # the reply needs 16 more tokens: something must go
    try:
        fitted = list(messages)
        ids, budget, dropped = fit_history(gen, fitted, 16)
    finally:
        gen.context_length = context
    assert dropped >= 1 and budget == 16 and len(ids) + 16 <= full
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1] and fitted[1]["role"] == "user"
    assert fitted == [messages[0], *messages[len(messages) - len(fitted) + 1 :]], "the oldest went first"


@pytest.mark.real_model
def test_a_cut_given_goes_first_and_stays_while_the_reply_fits(gen):
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        messages += [_turn("user", i), _turn("assistant", i)]
    messages.append(_turn("user", 3))
    fitted = list(messages)
    ids, budget, dropped = fit_history(gen, fitted, 16, cut=2)
    assert dropped == 0 and fitted == [messages[0], *messages[3:]] and ids == gen.encode(fitted)
    fitted = list(messages)
    fit_history(gen, fitted, 16, cut=100)  # more than there is: the new message stays
    assert fitted == [messages[0], messages[-1]]
    with pytest.raises(ContextLengthError, match="fills the model's context"):
        fit_history(gen, [{"role": "user", "content": "word " * 9000}], 16)
    # a message too long for any cut is refused, and the conversation before it is left whole (a chat
    # removes the refused message and goes on with its history)
    chat = [*messages[:-1], {"role": "user", "content": "word " * 9000}]
    before = list(chat)
    with pytest.raises(ContextLengthError):
        fit_history(gen, chat, 16, cut=2)
    assert chat == before


def _dropped_one_by_one(length, parts: int, room: int, context: int, cut: int) -> int:
    """The rule written as a loop: drop one part at a time; once one must go, until the headroom is free."""
    k, want = cut, room
    while k < parts and context - length(k) < want:
        k, want = k + 1, room + int(HEADROOM * context)
    return k


@pytest.mark.parametrize("seed", range(40))
def test_drop_count_bisects_to_what_dropping_one_at_a_time_gives(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(5, 120) for _ in range(rng.randint(0, 60))]
    calls = []

    def length(k: int) -> int:
        calls.append(k)
        return 40 + sum(sizes[k:])

    context, room, cut = rng.choice([256, 1000, 4096]), rng.randint(1, 100), rng.randint(0, len(sizes) + 2)
    got = drop_count(length, len(sizes), room, context, cut)
    assert len(calls) <= 2 + math.ceil(math.log2(len(sizes) + 1)), "a bisection, not a scan"
    assert got == _dropped_one_by_one(length, len(sizes), room, context, min(cut, len(sizes)))


def test_kept_cuts_find_each_recent_conversations_cut():
    cuts = KeptCuts(size=2)
    a, b, c = ([{"role": "user", "content": f"{name} {i}"} for i in range(6)] for name in ("a", "b", "c"))
    cuts.remember(a, 2)
    cuts.remember(b, 0)  # nothing dropped: nothing kept, nothing forgotten
    assert cuts.find(a + [{"role": "user", "content": "new"}]) == 2 and cuts.find(b) == 0
    cuts.remember(a, 4)  # the same conversation cut further: its new cut replaces the old
    assert cuts.find(a) == 4 and cuts.find(a[:3]) == 0
    cuts.remember(b, 1)
    assert cuts.find(a) == 4 and cuts.find(b) == 1
    cuts.remember(c, 3)  # size 2: the least recent go
    assert cuts.find(c) == 3 and cuts.find(b) == 1 and cuts.find(a) == 0
    assert cuts.find([{"role": "user", "content": "a 0"}, {"role": "user", "content": "changed"}]) == 0
