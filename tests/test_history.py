"""Fitting a conversation to the context (:func:`specdec.history.fit_history`), shared by ``chat`` and
``serve --fit-context``: what an exchange is, and a cut given by the turn before."""

from __future__ import annotations

import pytest

import specdec
from specdec.errors import ContextLengthError
from specdec.history import fit_history

pytestmark = pytest.mark.real_model


def _turn(role: str, i: int) -> dict[str, str]:
    return {"role": role, "content": f"{role} {i}: " + "some words " * 10}


@pytest.fixture(scope="module")
def gen(smollm2):
    return specdec.SpeculativeGenerator(*smollm2, method="none")


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
