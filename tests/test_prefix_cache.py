"""Prefix reuse: a generator keeps the KV of its last prompt and reply, and a chat's next turn computes only
what is new. The output must stay what plain greedy decoding of the whole prompt gives, whatever was kept,
whatever cut the last generation short."""

from __future__ import annotations

import pytest

import specdec
from specdec import kvcache
from specdec.errors import StaticCacheMemoryError
from conftest import hf_greedy, tiny_model
from test_static import METHODS, PROMPT, _generator, sampling_setup

USER = [[70, 71, 72, 5, 17], [80, 81, 33, 8, 61, 2], [90, 3, 3, 44]]  # each turn's "user message"


def _turns(gen: specdec.SpeculativeGenerator, target, n_new: int = 16) -> list[specdec.GenerationResult]:
    """Three chat turns on ``gen``: each prompt is the last prompt, its reply and a new message;
    every reply is checked against plain greedy decoding of the whole prompt."""
    prompt, results = list(PROMPT), []
    for user in USER:
        prompt = prompt + user
        res = gen.generate(prompt, max_new_tokens=n_new)
        assert res.token_ids == hf_greedy(target, prompt, n_new), (len(results), prompt)
        results.append(res)
        prompt = prompt + res.token_ids
    return results


@pytest.mark.parametrize("static_cache", [False, True])
@pytest.mark.parametrize("method,options", METHODS)
def test_every_turn_equals_greedy_and_reuses_the_last_turn(method, options, static_cache):
    target = tiny_model("qwen2", seed=0, sharpness=3.0)
    gen = _generator(target, method, options, static_cache=static_cache)
    first, *later = _turns(gen, target)
    assert first.stats.cached_tokens == 0
    previous = len(PROMPT) + len(USER[0]) + len(first.token_ids)
    for res, user in zip(later, USER[1:]):
        # everything before the last reply's final token (whose KV a step never computes) was kept
        assert res.stats.cached_tokens == previous - 1
        assert res.stats.to_dict()["cached_tokens"] == res.stats.cached_tokens
        previous += len(user) + len(res.token_ids)


def test_a_prompt_that_differs_early_keeps_only_the_shared_part():
    target = tiny_model("llama", seed=0, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="prompt_lookup")
    gen.generate(PROMPT, max_new_tokens=12)
    edited = PROMPT[:5] + [90, 91] + PROMPT[5:]
    res = gen.generate(edited, max_new_tokens=12)
    assert res.stats.cached_tokens == 5
    assert res.token_ids == hf_greedy(target, edited, 12)
    again = gen.generate(edited, max_new_tokens=12)  # "regenerate": all but the last prompt token is kept
    assert again.stats.cached_tokens == len(edited) - 1 and again.token_ids == res.token_ids


def test_the_draft_model_prefills_only_what_is_new():
    target, draft = tiny_model("llama", seed=0, sharpness=3.0), tiny_model("llama", seed=7, sharpness=3.0)
    rows: list[int] = []
    draft.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    gen = specdec.SpeculativeGenerator(  # rows as the dynamic path runs them (the static path pads them)
        target, method="draft", draft=draft, num_speculative_tokens=3, ngram_first=False, int8=False, static_cache=False
    )
    first = gen.generate(PROMPT, max_new_tokens=12)
    assert rows[0] == len(PROMPT) - 1  # the draft's own prefill, before the pending token
    rows.clear()
    prompt = PROMPT + first.token_ids + USER[0]
    assert gen.generate(prompt, max_new_tokens=12).token_ids == hf_greedy(target, prompt, 12)
    # the new message and the reply's last tokens (a step's accepted draft tokens are fed next step), not
    # the history
    assert rows[0] <= len(USER[0]) + 4


@pytest.mark.parametrize("method,options", METHODS)
def test_other_prompts_between_turns_do_not_cost_the_conversation_its_cache(method, options):
    """A chat UI asks for a title or follow-up suggestions between turns, or the user switches chats: the
    conversation's cache (the target's and the draft's) is kept aside and taken back by its next turn."""
    target = tiny_model("qwen2", seed=0, sharpness=3.0)
    gen = _generator(target, method, options, static_cache=False)
    chat = PROMPT + USER[0]
    first = gen.generate(chat, max_new_tokens=16)
    task = PROMPT[:3] + [7, 7, 9, 11] + USER[0]  # another prompt: shares only the first tokens
    asked = gen.generate(task, max_new_tokens=8)
    assert asked.stats.cached_tokens == 3, "the shared prefix is reused by the other prompt"
    other = [60, 61, 62, 63, 64, 65]
    gen.generate(other, max_new_tokens=8)  # a second chat
    chat += first.token_ids + USER[1]
    res = gen.generate(chat, max_new_tokens=16)
    assert res.token_ids == hf_greedy(target, chat, 16)
    kept = gen.kv.conversations
    if kept == 1:  # an accelerator keeps one conversation: the chat was computed again
        assert res.stats.cached_tokens < len(chat) // 2
        return
    assert res.stats.cached_tokens == len(PROMPT) + len(USER[0]) + len(first.token_ids) - 1
    caches = [gen.kv, *([gen.proposer.kv] if method == "draft" else [])]
    assert all(len(kv.aside) == 2 for kv in caches), "the task and the second chat are kept aside"
    again = gen.generate(task, max_new_tokens=8)
    assert again.stats.cached_tokens == len(task) - 1 and again.token_ids == asked.token_ids
    for i in range(kept):  # more conversations than are kept: the least recently used go
        gen.generate([50 + i] + other, max_new_tokens=4)
    assert all(len(kv.aside) == kept - 1 for kv in caches)
    assert gen.generate(chat, max_new_tokens=4).stats.cached_tokens < len(chat) // 2


@pytest.mark.parametrize("method,options", METHODS)
def test_two_chats_under_one_system_prompt_keep_their_own_caches(method, options):
    """Short chats under the same (long) system prompt share most of their first prompts: switching from one
    to the other must not cost the first its cache (it departs within the first's prompt: another chat)."""
    target = tiny_model("qwen2", seed=0, sharpness=3.0)
    gen = _generator(target, method, options, static_cache=False)
    if gen.kv.conversations == 1:
        pytest.skip("an accelerator keeps one conversation: nothing is kept aside")
    system = PROMPT + [12, 13, 14, 15, 16, 17, 18, 19]
    x, y = system + [70, 71], system + [80, 81]
    first = gen.generate(x, max_new_tokens=6)
    assert gen.generate(y, max_new_tokens=6).stats.cached_tokens == len(system)
    x += first.token_ids + USER[1]
    res = gen.generate(x, max_new_tokens=8)
    assert res.stats.cached_tokens == len(system) + 2 + len(first.token_ids) - 1
    assert res.token_ids == hf_greedy(target, x, 8)


def test_conversations_kept_aside_hold_at_most_their_share_of_the_free_memory(monkeypatch):
    """The count is not the only bound: a large model's long chats kept aside would take gigabytes, so they
    hold at most :data:`specdec.kvcache.ASIDE_MEMORY` of the RAM that would be free without them."""
    target = tiny_model("qwen2", seed=0, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="prompt_lookup", static_cache=False)
    chats = [[40 + i, 41, 42, 43, 44, 45, 46, 47] for i in range(3)]
    if gen.kv.conversations < 3:
        pytest.skip("an accelerator keeps one conversation: nothing is kept aside")
    gen.generate(chats[0], max_new_tokens=8)
    one = kvcache.cache_bytes(gen.kv.cache)
    # free memory such that the share of it (the kept caches counted as free) holds one chat, not two:
    # held <= share * (free + held) while held <= free * share / (1 - share) = 1.5 * one
    share = kvcache.ASIDE_MEMORY
    monkeypatch.setattr(kvcache, "ram", lambda: (0, int(1.5 * one * (1 - share) / share)))
    for chat in chats[1:]:
        gen.generate(chat, max_new_tokens=8)
    assert [int(known[0]) for _, _, known in gen.kv.aside] == [41], "only the most recent chat is kept aside"
    res = gen.generate(chats[1], max_new_tokens=8)
    assert res.stats.cached_tokens == len(chats[1]) - 1 and res.token_ids == hf_greedy(target, chats[1], 8)
    assert gen.generate(chats[0], max_new_tokens=8).stats.cached_tokens == 0, "the oldest chat went"
    monkeypatch.setattr(kvcache, "ram", lambda: (0, 0))  # unknown: bounded by the count alone
    for chat in chats:
        gen.generate(chat, max_new_tokens=8)
    assert len(gen.kv.aside) == min(len(chats), gen.kv.conversations) - 1


def test_off_means_every_generation_starts_empty():
    target = tiny_model("llama", seed=0, sharpness=3.0)
    rows: list[int] = []
    target.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    gen = specdec.SpeculativeGenerator(
        target, method="draft", draft=target, prefix_cache=False, int8=False, static_cache=False
    )  # rows as the dynamic path runs them
    first = gen.generate(PROMPT, max_new_tokens=8)
    prompt = PROMPT + first.token_ids + USER[0]
    rows.clear()
    res = gen.generate(prompt, max_new_tokens=8)
    assert res.stats.cached_tokens == 0 and res.token_ids == hf_greedy(target, prompt, 8)
    assert len(prompt) - 1 in rows  # the whole prompt was prefilled again (by the target and the draft)
    assert not gen.kv.reuse and not gen.proposer.kv.reuse


@pytest.mark.parametrize("static_cache", [False, True])
def test_a_stream_closed_early_leaves_a_cache_the_next_turn_can_use(static_cache):
    target = tiny_model("qwen2", seed=0, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="lookahead", static_cache=static_cache)
    stream = gen.stream(PROMPT, max_new_tokens=30)
    shown = [t for _, event in zip(range(3), stream) for t in event.token_ids]  # the user pressed Stop
    stream.close()
    prompt = PROMPT + shown + USER[0]
    res = gen.generate(prompt, max_new_tokens=16)
    assert res.stats.cached_tokens == len(PROMPT) + len(shown) - 1
    assert res.token_ids == hf_greedy(target, prompt, 16)


@pytest.mark.parametrize("static_cache", [False, True])
def test_a_forward_cut_short_is_never_trusted(static_cache):
    """An exception inside a forward (Ctrl-C in the API, out of memory) may leave some layers written and
    others not: the next generation computes the whole prompt again."""
    target = tiny_model("llama", seed=0, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="prompt_lookup", static_cache=static_cache)
    gen.generate(PROMPT, max_new_tokens=8)
    calls = []

    def fail_once(_module, _args, _output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    hook = target.model.layers[0].register_forward_hook(fail_once)
    prompt = PROMPT + [1, 2, 3]
    with pytest.raises(KeyboardInterrupt):
        gen.generate(prompt, max_new_tokens=8)
    hook.remove()
    res = gen.generate(prompt + [4], max_new_tokens=8)
    assert res.stats.cached_tokens == 0
    assert res.token_ids == hf_greedy(target, prompt + [4], 8)


GROWING = [m for m in METHODS if m[0] != "prompt_lookup" and m != ("lookahead", {})]  # every cache kind once


def _outgrow(gen: specdec.SpeculativeGenerator, target) -> tuple[list[int], specdec.GenerationResult, int]:
    """A first turn, then a second whose prompt reaches past the static cache's allocated positions;
    returns the second prompt, its result and the first cache's capacity."""
    first = gen.generate(PROMPT, max_new_tokens=8)
    capacity = gen.kv.capacity
    prompt = PROMPT + first.token_ids + [7] * (capacity - len(PROMPT))
    res = gen.generate(prompt, max_new_tokens=8)
    assert gen.kv.capacity > capacity
    assert res.token_ids == hf_greedy(target, prompt, 8)
    return prompt, res, len(PROMPT) + len(first.token_ids)


@pytest.mark.parametrize("method,options", GROWING)
def test_a_static_cache_that_must_grow_keeps_the_conversation(method, options):
    from specdec import static

    target = tiny_model("llama", seed=0, sharpness=3.0, max_positions=2048)
    gen = _generator(target, method, options, static_cache=True)
    _, res, previous = _outgrow(gen, target)
    assert isinstance(gen.kv, static.StaticKV)
    assert res.stats.cached_tokens == previous - 1  # the first turn's KV moved to the larger cache
    follow = gen.generate(PROMPT + [3], max_new_tokens=8)  # and the larger cache is used like the first
    assert follow.token_ids == hf_greedy(target, PROMPT + [3], 8)


def test_a_static_cache_whose_growth_does_not_fit_beside_the_old_one_starts_over(monkeypatch):
    """When the larger cache cannot be allocated while the old one is held, the old one goes first and
    the prompt is computed again, exactly."""
    from specdec import static

    target = tiny_model("llama", seed=0, sharpness=3.0, max_positions=2048)
    gen = specdec.SpeculativeGenerator(target, method="none", static_cache=True)
    allocate, failed = static.StaticKV._allocate, []

    def only_when_alone(kv, capacity):
        if kv.cache is not None and not failed:  # a growth while the old cache is still held
            failed.append(capacity)
            kv.cache = None
            raise StaticCacheMemoryError(1.0, capacity)
        allocate(kv, capacity)

    monkeypatch.setattr(static.StaticKV, "_allocate", only_when_alone)
    _, res, _ = _outgrow(gen, target)
    assert failed and res.stats.cached_tokens == 0


@pytest.mark.parametrize("method", ["none", "draft", "medusa"])
def test_seeded_sampling_is_the_same_with_a_kept_prefix(method):
    target, options = sampling_setup(method)
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=99)
    prompt = [1, 5, 9, 2, 1, 5]
    warm = _generator(target, method, options, static_cache=False)
    first = warm.generate(prompt, **kwargs).token_ids
    follow = prompt + first + [3, 4]
    kept = warm.generate(follow, **kwargs)
    assert kept.stats.cached_tokens > len(prompt)
    fresh = _generator(target, method, options, static_cache=False).generate(follow, **kwargs).token_ids
    assert kept.token_ids == fresh
    # the same turn again after another conversation: its cache is taken back from aside
    warm.generate([7, 7, 8, 8, 9], **kwargs)
    back = warm.generate(follow, **kwargs)
    if warm.kv.conversations > 1:
        assert back.stats.cached_tokens == len(follow) - 1
    assert back.token_ids == fresh


@pytest.mark.real_model
def test_a_real_chat_keeps_its_history(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Name three rivers of Europe."}]
    for method in ("none", "draft"):
        gen = specdec.SpeculativeGenerator(model, tokenizer, method=method, draft=model if method == "draft" else None)
        chat = list(messages)
        for turn, question in enumerate(["Which is the longest?", "And the shortest?"]):
            reply = gen.generate(chat, max_new_tokens=24)
            prompt = gen.encode(chat)
            assert reply.token_ids == hf_greedy(model, prompt, 24), (method, turn)
            assert (reply.stats.cached_tokens > 0) == (turn > 0)
            chat += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": question}]
        assert gen.generate(chat, max_new_tokens=24).stats.cached_tokens > len(prompt) - 2
