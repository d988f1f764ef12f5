"""``serve --fit-context``: a chat that outgrows the context loses its oldest messages instead of a 400, and
the cut is kept from request to request, so the KV cache of the turns before is reused.

The app runs in-process under uvicorn on 127.0.0.1 (its model's context set to 400 tokens so that the limit
comes after a few turns), driven over HTTP by the ``openai`` client the way a chat UI drives it: every
request sends the whole conversation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import specdec  # noqa: E402
from conftest import app_served  # noqa: E402
from specdec.server.app import ServerConfig, create_app  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CONTEXT = 400
MODEL = "smollm2-135m"


@contextlib.contextmanager
def _serving(model, tokenizer, fit_context: bool) -> Iterator[openai.OpenAI]:
    """A running server (uvicorn in a thread) and its client; the context cut to ``CONTEXT`` tokens."""
    gen = specdec.SpeculativeGenerator(model, tokenizer, method="prompt_lookup")
    gen.context_length = CONTEXT
    with app_served(create_app(gen, ServerConfig(model_id=MODEL, fit_context=fit_context))) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)


def _question(i: int) -> str:
    return f"Question {i}: " + "tell me more " * 8


@pytest.fixture(scope="module")
def fitting(smollm2):
    with _serving(*smollm2, fit_context=True) as client:
        yield client


def test_without_it_an_outgrown_chat_is_a_400_that_names_the_option(smollm2):
    with _serving(*smollm2, fit_context=False) as client:
        messages = [{"role": "user", "content": _question(0) * 20}]
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        assert info.value.code == "context_length_exceeded" and "--fit-context" in str(info.value)


def test_an_outgrown_chat_drops_its_oldest_messages_and_keeps_the_cut(fitting, smollm2):
    """Every turn is the model's own reply to what it saw, and the turns between cuts reuse the KV cache,
    also with the chat UI's other requests between them."""
    model, tokenizer = smollm2
    cold = specdec.SpeculativeGenerator(model, tokenizer, method="none", prefix_cache=False)
    history = [{"role": "system", "content": "Be brief."}]
    turns = []  # (messages dropped, prompt tokens, prompt tokens whose KV cache was kept)
    for i in range(12):
        history.append({"role": "user", "content": _question(i)})
        r = fitting.chat.completions.create(model=MODEL, messages=history, max_tokens=16, temperature=0)
        dropped = r.model_extra["specdec"].get("dropped_messages", 0)
        sent = [history[0], *history[1 + dropped :]]  # what the model saw
        assert r.choices[0].message.content == cold.generate(sent, max_new_tokens=16).text
        turns.append((dropped, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        # a chat UI's own request between turns (follow-up suggestions): another conversation, which must
        # not make the server forget this one's cut
        task = f"Suggest follow-up questions for this chat:\n{_question(i)}\n{r.choices[0].message.content}"
        fitting.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": task}], max_tokens=4, temperature=0
        )
    assert turns[-1][0] > 0, f"the chat never outgrew the context: {turns}"
    cuts = [i for i in range(1, len(turns)) if turns[i][0] != turns[i - 1][0]]
    assert cuts and len(cuts) <= len(turns) // 3, turns
    for i in range(1, len(turns)):
        if i not in cuts:  # the same cut as the turn before: its prompt and reply are kept
            assert turns[i][2] >= turns[i - 1][1] - 1, f"turn {i} computed the conversation again: {turns}"
    # streamed, the last chunk says it too
    history.append({"role": "user", "content": _question(12)})
    chunks = list(
        fitting.chat.completions.create(model=MODEL, messages=history, max_tokens=16, temperature=0, stream=True)
    )
    assert chunks[-1].model_extra["specdec"]["dropped_messages"] >= turns[-1][0]


def test_a_last_message_that_alone_fills_the_context_is_still_a_400(fitting):
    messages = [{"role": "user", "content": "word " * (2 * CONTEXT)}]
    with pytest.raises(openai.BadRequestError) as info:
        fitting.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert info.value.code == "context_length_exceeded" and "fills the model's context" in str(info.value)
