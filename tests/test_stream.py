"""Streaming: incremental text that never breaks a UTF-8 character, stop strings, and their edges."""

from __future__ import annotations

import threading

import pytest

import specdec
from specdec.errors import GeneratorBusyError
from specdec.stream import IncrementalDecoder, StopStringMatcher
from conftest import hf_greedy, tiny_model


def test_stop_matcher_holds_back_partial_and_cuts_before_stop():
    m = StopStringMatcher(["</end>"])
    assert m.push("hello </e") == ("hello ", False)  # "</e" may start the stop string: held back
    assert m.push("nd> more") == ("", True)
    assert m.text == "hello "


def test_stop_matcher_releases_false_alarm_and_finishes():
    m = StopStringMatcher(["STOP"])
    assert m.push("a ST") == ("a ", False)
    assert m.push("ART") == ("START", False)
    assert m.push(" S") == (" ", False)
    assert m.finish() == "S"


def test_stop_matcher_without_stops_passes_through():
    m = StopStringMatcher(None)
    assert m.push("abc") == ("abc", False)
    assert m.finish() == ""


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["bb", "a"])
    out, hit = m.push("xxbba")
    assert (out, hit) == ("xx", True)


@pytest.mark.real_model
def test_incremental_decoder_never_emits_broken_characters(smollm2):
    _, tok = smollm2
    text = "Grüße aus Köln 🌊🏞️ — 日本語のテキスト."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tok)
    pieces = [dec.add([i]) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    # the emoji is split over several byte tokens, so some steps emit nothing
    assert any(p == "" for p in pieces[:-1])


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["none", "prompt_lookup", "draft"])
def test_stream_equals_generate_and_stop_strings_cut(smollm2, method):
    model, tok = smollm2
    gen = specdec.SpeculativeGenerator(
        model,
        tok,
        method=method,
        draft=model if method == "draft" else None,
        num_speculative_tokens=3 if method == "draft" else None,
    )
    messages = [{"role": "user", "content": "List three colours, one per line."}]
    full = gen.generate(messages, max_new_tokens=40)
    events = list(gen.stream(messages, max_new_tokens=40))
    assert "".join(e.text for e in events) == full.text
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert events[-1].done and all(not e.done for e in events[:-1])
    # a stop string taken from the reply cuts the text right before it, and the reply ends at the token that
    # completes it, as plain decoding (one token a step) ends, whatever the step accepted beyond that token:
    # the tokens returned and counted are the same for every method
    for at in (0.3, 0.4, 0.5, 0.6, 0.7):
        stop = full.text[int(len(full.text) * at) :][:4]
        cut = gen.generate(messages, max_new_tokens=40, stop=[stop])
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(stop)]
        ends = [n for n in range(1, len(full.token_ids) + 1) if stop in tok.decode(full.token_ids[:n])]
        assert cut.token_ids == full.token_ids[: ends[0]]
        assert cut.stats.new_tokens == ends[0]


@pytest.mark.parametrize("method", ["none", "prompt_lookup", "lookahead", "draft"])
def test_a_paused_stream_cannot_resume_on_a_cache_another_generation_took(method):
    """Another generation while a stream waits takes the KV caches over: the paused stream ends with a clear error
    instead of going on with wrong text, and the generation in between is exact."""
    model = tiny_model("llama", seed=0, sharpness=4.0)
    gen = specdec.SpeculativeGenerator(model, method=method, draft=model if method == "draft" else None)
    a, b = [5, 9, 11, 5, 9], [40, 2, 17, 33]
    paused = gen.stream(a, max_new_tokens=24)
    next(paused)
    assert gen.generate(b, max_new_tokens=24).token_ids == hf_greedy(model, b, 24)
    with pytest.raises(GeneratorBusyError, match="paused"):
        list(paused)
    assert gen.generate(a, max_new_tokens=24).token_ids == hf_greedy(model, a, 24)  # and the generator goes on


def test_two_threads_on_one_generator_get_a_clear_error_or_the_exact_reply():
    model = tiny_model("llama", seed=0, sharpness=4.0, max_positions=1024)
    gen = specdec.SpeculativeGenerator(model, method="prompt_lookup")
    prompts = [[5, 9, 11, 5, 9], [40, 2, 17, 33]]
    references = [hf_greedy(model, prompt, 300) for prompt in prompts]
    start = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def run(i: int) -> None:
        start.wait()
        try:
            result = gen.generate(prompts[i], max_new_tokens=300)
            outcomes[i] = (result.prompt_ids, result.token_ids)
        except Exception as e:  # noqa: BLE001 - the test looks at what was raised
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for outcome, prompt, reference in zip(outcomes, prompts, references):
        assert outcome == (prompt, reference) or isinstance(outcome, GeneratorBusyError), outcome
    assert any(isinstance(o, GeneratorBusyError) for o in outcomes)  # both started together: one was turned away
    assert gen.generate(prompts[0], max_new_tokens=300).token_ids == references[0]


def test_each_event_holds_its_own_stats_and_they_count_decoding_only():
    """A chat UI spends time with each event (drawing it): that time is not decoding time, and an event kept
    for later still shows the counts of its own moment."""
    import time

    gen = specdec.SpeculativeGenerator(tiny_model("llama", seed=0), method="none")
    pause, events = 0.3, []
    begun = time.perf_counter()
    for event in gen.stream([5, 9, 11], max_new_tokens=4):
        events.append(event)
        time.sleep(pause)
    wall = time.perf_counter() - begun
    assert [e.stats.new_tokens for e in events] == [1, 2, 3, 4]
    assert events[-1].stats.seconds <= wall - 3 * pause  # the three pauses before the last event do not count
    assert gen.last_stats.new_tokens == 4 and gen.last_stats.seconds == events[-1].stats.seconds
