"""Lookahead decoding: window layout, n-gram pool, trie, losslessness (greedy and sampling)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import specdec
from specdec.errors import SpecdecError, UnsupportedModelError
from specdec.ngrams import next_copy_length
from specdec.proposers.base import DecodeState
from specdec.proposers.lookahead import (
    JacobiWindow,
    LookaheadProposer,
    NgramPool,
    build_trie,
    window_layout,
)
from specdec.proposers.options import LookaheadOptions
from specdec.sampling import SamplingConfig
from conftest import tiny_model


def cpu_model(arch: str = "llama", **kwargs) -> torch.nn.Module:
    """:func:`conftest.tiny_model` on the CPU whatever ``--device`` says: these tests build their inputs there."""
    return tiny_model(arch, device="cpu", **kwargs)


def prompt_ids(n: int = 16, vocab: int = 96, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- window layout


@pytest.mark.parametrize(
    "W,L,positions,expected",
    [
        pytest.param(
            3,
            2,
            [1, 2, 3, 2, 3, 4],
            # rows: (l0,w0) (l0,w1) (l0,w2) (l1,w0) (l1,w1) (l1,w2); column 0 is the root
            [
                # root l0w0 l0w1 l0w2 l1w0 l1w1 l1w2
                [1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0],
                [1, 1, 0, 0, 1, 0, 0],
                [1, 1, 1, 0, 0, 1, 0],
                [1, 1, 1, 1, 0, 0, 1],
            ],
            id="w3-two-levels",
        ),
        pytest.param(
            2,
            3,
            [1, 2, 2, 3, 3, 4],
            [
                # root l0w0 l0w1 l1w0 l1w1 l2w0 l2w1
                [1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0],
                [1, 1, 0, 1, 0, 0, 0],
                [1, 1, 1, 0, 1, 0, 0],
                [1, 1, 0, 1, 0, 1, 0],
                [1, 1, 1, 0, 1, 0, 1],
            ],
            id="w2-three-levels",
        ),
    ],
)
def test_window_layout_table(W: int, L: int, positions: list[int], expected: list[list[int]]) -> None:
    got_positions, allowed = window_layout(W, L)
    assert got_positions.tolist() == positions
    assert allowed.int().tolist() == expected


@pytest.mark.parametrize("W,L", [(1, 1), (1, 3), (4, 1), (4, 3), (5, 4)])
def test_window_layout_is_a_causal_prefix(W: int, L: int) -> None:
    """Every row sees exactly one row per earlier offset: a contiguous causal sequence."""
    positions, allowed = window_layout(W, L)
    all_pos = torch.cat([torch.zeros(1, dtype=torch.long), positions])
    for r in range(W * L):
        seen = sorted(all_pos[allowed[r]].tolist())
        assert seen == list(range(int(positions[r]) + 1))


def test_draft_rows_mask_and_positions() -> None:
    """Candidates as a trie; the window's extra mask sees the root and window rows only."""
    cfg = LookaheadOptions(window_size=2, ngram_size=3, guess_size=3, copy_tokens=0)  # pool candidates only
    proposer = LookaheadProposer(cfg)
    tokens = torch.tensor([5, 6, 7, 5, 6, 8, 5, 9, 1, 5])
    state = DecodeState(tokens=tokens, prompt_length=10, sampling=SamplingConfig(), generator=None)
    proposer.reset(state)
    proposer.window.advance([40, 41])  # a second level
    draft = proposer.propose(state, max_nodes=8)
    # continuations of 5, most recent first: (9,1) (6,8) (6,7) -> trie 9-1, 6-8, 6-7
    assert draft.tokens.tolist() == [9, 1, 6, 8, 7]
    assert draft.parents.tolist() == [-1, 0, -1, 2, 2]
    assert draft.extra_tokens.tolist()[2:] == [40, 41]
    assert draft.extra_positions.tolist() == [1, 2, 2, 3]
    n, m = 5, 4
    assert tuple(draft.extra_mask.shape) == (m, 1 + n + m)
    assert not draft.extra_mask[:, 1 : 1 + n].any()
    assert draft.extra_mask[:, 0].all()
    assert draft.extra_mask[:, 1 + n :].int().tolist() == window_layout(2, 2)[1][:, 1:].int().tolist()
    # depth is capped by max_nodes
    assert proposer.propose(state, max_nodes=1).tokens.tolist() == [9, 6]
    assert proposer.propose(state, max_nodes=0).num_extra == 0


def test_context_copy_is_the_first_candidate() -> None:
    """The tokens after the latest earlier occurrence of the current 2-3 token suffix lead the trie."""
    cfg = LookaheadOptions(window_size=2, ngram_size=3, guess_size=2, copy_tokens=4)
    proposer = LookaheadProposer(cfg)
    tokens = torch.tensor([3, 4, 5, 6, 7, 8, 9, 3, 4])
    state = DecodeState(tokens=tokens, prompt_length=9, sampling=SamplingConfig(), generator=None)
    proposer.reset(state)
    draft = proposer.propose(state, max_nodes=8)
    # copy (suffix 3,4 seen at 0): 5 6 7 8 (copy_length starts at min(8, copy_tokens) = 4); pool key 4: (5, 6)
    assert draft.tokens.tolist() == [5, 6, 7, 8]
    assert draft.parents.tolist() == [-1, 0, 1, 2]
    assert proposer.propose(state, max_nodes=2).tokens.tolist() == [5, 6]
    off = LookaheadProposer(LookaheadOptions(window_size=2, ngram_size=3, guess_size=2, copy_tokens=0))
    off.reset(state)
    assert off.propose(state, max_nodes=8).tokens.tolist() == [5, 6]


@pytest.mark.parametrize(
    "copy,new,length,longest,expected",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4, 9], 4, 32, 8),  # all kept: doubles
        ([1, 2, 3, 4], [1, 2, 3, 4, 9], 20, 32, 8),  # twice what was kept, not twice the length
        ([1, 2, 3, 4], [1, 2, 7], 4, 32, 4),  # two kept
        ([1, 2, 3, 4], [7], 8, 32, 4),  # none kept: halves
        ([1, 2], [7], 2, 32, 2),  # never below 2
        ([1] * 20, [1] * 21, 20, 32, 32),  # never above the limit
    ],
)
def test_copy_length_rule(copy, new, length, longest, expected) -> None:
    assert next_copy_length(copy, new, length, longest) == expected


# ---------------------------------------------------------------- pool, window, trie


def test_pool_insertion_and_lru_eviction() -> None:
    pool = NgramPool(ngram_size=3, capacity=2)
    pool.add([1, 2, 3])
    pool.add([1, 4, 5])
    assert pool.candidates(1) == [(4, 5), (2, 3)]
    pool.add([1, 2, 3])  # refresh: now the most recent
    assert pool.candidates(1) == [(2, 3), (4, 5)]
    pool.add([1, 6, 7])  # evicts the least recent, (4, 5)
    assert pool.candidates(1) == [(6, 7), (2, 3)]
    pool.add([2, 3, 4])
    assert pool.candidates(2) == [(3, 4)]
    assert pool.candidates(9) == []
    assert len(pool) == 3


def test_pool_add_sequence_is_incremental() -> None:
    pool = NgramPool(ngram_size=3, capacity=4)
    seq = [1, 2, 3, 1, 2]
    nxt = pool.add_sequence(seq)
    assert nxt == 3
    assert pool.candidates(1) == [(2, 3)]
    assert pool.candidates(2) == [(3, 1)]
    assert pool.candidates(3) == [(1, 2)]
    seq += [4]
    assert pool.add_sequence(seq, nxt) == 4
    assert pool.candidates(1) == [(2, 4), (2, 3)]
    assert pool.add_sequence([7, 8], 0) == 0  # too short for any n-gram


def test_window_warm_up_and_ngrams() -> None:
    window = JacobiWindow([1, 2], ngram_size=3)
    assert window.advance([3, 4]) == []  # warm-up: a second level
    assert window.tokens() == [1, 2, 3, 4]
    assert window.advance([5, 6]) == [[1, 3, 5], [2, 4, 6]]
    assert window.levels == [[3, 4], [5, 6]]
    bigram = JacobiWindow([7], ngram_size=2)
    assert bigram.advance([8]) == [[7, 8]]
    assert bigram.tokens() == [8]


def test_trie_merges_shared_prefixes() -> None:
    tokens, parents = build_trie([(1, 2, 3), (1, 2, 4), (5, 6, 7), (1, 8, 9)], max_depth=3)
    assert tokens == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert parents == [-1, 0, 1, 1, -1, 4, 5, 0, 7]
    assert build_trie([(1, 2, 3), (1, 4, 5)], max_depth=1) == ([1], [-1])
    assert build_trie([], max_depth=3) == ([], [])


def test_config_validation() -> None:
    with pytest.raises(SpecdecError):
        LookaheadOptions(ngram_size=1)
    with pytest.raises(SpecdecError):
        LookaheadOptions(window_size=0)
    with pytest.raises(SpecdecError):
        LookaheadOptions(guess_size=2.5)
    with pytest.raises(SpecdecError):
        specdec.SpeculativeGenerator(cpu_model(), method="lookahead", min_ngram=2)


def test_flash_attention_is_refused_with_a_hint() -> None:
    model = cpu_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="prompt_lookup"):
        specdec.SpeculativeGenerator(model, method="lookahead")


# ---------------------------------------------------------------- the window's rows are exact


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_window_rows_equal_sequential_forwards(arch: str, attn: str) -> None:
    """Each window row's logits equal a plain forward over the causal prefix it is meant to see."""
    torch.set_default_dtype(torch.float32)
    model = cpu_model(arch, attn=attn)
    prompt = prompt_ids(8) * 2  # repeats, so the pool has candidates
    gen = specdec.SpeculativeGenerator(model, method="lookahead", window_size=3, ngram_size=4, guess_size=3)
    captured = []
    original = gen.proposer.observe
    gen.proposer.observe = lambda outcome: (captured.append(outcome), original(outcome))[1]
    gen.generate(prompt, max_new_tokens=12)
    full = [o for o in captured if o.proposal.num_extra == 9]  # the window has all 3 levels
    assert full and any(o.proposal.num_nodes for o in full)
    outcome = max(full, key=lambda o: o.proposal.num_nodes)
    draft = outcome.proposal
    n, m = draft.num_nodes, draft.num_extra
    committed = outcome.tokens[: outcome.tokens.numel() - outcome.new_tokens.numel()].tolist()
    rows = [committed[-1]] + draft.tokens.tolist() + draft.extra_tokens.tolist()
    allowed = draft.extra_mask
    positions = draft.extra_positions
    for r in range(m):
        visible = [c for c in range(1 + n + m) if allowed[r, c]]
        order = sorted(visible, key=lambda c: 0 if c == 0 else int(positions[c - 1 - n]))
        seq = committed + [rows[c] for c in order[1:]]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq], device=model.device)).logits[0, -1]
        torch.testing.assert_close(outcome.logits[1 + n + r], ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- greedy equality


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("W,N,G", [(1, 2, 1), (3, 3, 2), (4, 4, 4), (5, 5, 7)])
def test_greedy_equals_generate(arch: str, attn: str, W: int, N: int, G: int) -> None:
    model = cpu_model(arch, attn=attn)
    prompt = prompt_ids(14)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=48, min_new_tokens=48, do_sample=False)
    gen = specdec.SpeculativeGenerator(model, method="lookahead", window_size=W, ngram_size=N, guess_size=G)
    out = gen.generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref[0, len(prompt) :].tolist()
    assert out.stats.steps < 48  # something was accepted (tiny random models repeat themselves)


@pytest.mark.parametrize("copy_tokens", [0, 4, 32])
def test_greedy_with_and_without_context_copies_equals_generate(copy_tokens: int) -> None:
    model = cpu_model("llama")
    prompt = prompt_ids(14) * 2  # a prompt that repeats itself gives copies to verify
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    gen = specdec.SpeculativeGenerator(model, method="lookahead", copy_tokens=copy_tokens)
    assert gen.generate(prompt, max_new_tokens=40).token_ids == ref[0, len(prompt) :].tolist()


def test_greedy_with_repetition_penalty_equals_generate() -> None:
    model = cpu_model("qwen2")
    prompt = prompt_ids(14)
    ref = model.generate(
        torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, repetition_penalty=1.3
    )
    gen = specdec.SpeculativeGenerator(model, method="lookahead", window_size=3, ngram_size=3, guess_size=3)
    out = gen.generate(prompt, max_new_tokens=32, repetition_penalty=1.3)
    assert out.token_ids == ref[0, len(prompt) :].tolist()


# ---------------------------------------------------------------- sampling


def exact_distribution(model, prompt: list[int], steps: int, cfg: SamplingConfig) -> dict[tuple[int, ...], float]:
    """Probability of every sequence of ``steps`` tokens under ``model`` with ``cfg``, by enumeration."""
    from specdec.sampling import process_logits

    vocab = model.config.vocab_size
    dist = {(): 1.0}
    for _ in range(steps):
        prefixes = list(dist)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        probs = process_logits(logits, cfg)
        dist = {p + (t,): dist[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(vocab)}
    return dist


def total_variation(counts: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float], total: int) -> float:
    return 0.5 * sum(abs(counts.get(k, 0) / total - p) for k, p in exact.items())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), pytest.param(0.7, 3, 0.9, marks=pytest.mark.slow)])
def test_sampling_matches_target_distribution(temperature: float, top_k: int, top_p: float, runs: int = 500) -> None:
    """Histogram of the first 3 tokens over seeded runs vs the exact target distribution."""
    vocab, steps = 4, 3
    model = cpu_model("llama", vocab=vocab, init=0.6)  # peaked distributions, so acceptance happens
    prompt = [0, 1, 2, 3, 0, 1, 2, 0, 1, 3, 0, 1]
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    exact = exact_distribution(model, prompt, steps, cfg)
    gen = specdec.SpeculativeGenerator(model, method="lookahead", window_size=2, ngram_size=3, guess_size=3)
    counts: dict[tuple[int, ...], int] = {}
    accepted = 0
    for seed in range(runs):
        out = gen.generate(prompt, max_new_tokens=steps, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        key = tuple(out.token_ids)
        counts[key] = counts.get(key, 0) + 1
        accepted += out.stats.accepted
    assert sum(counts.values()) == runs and all(len(k) == steps for k in counts)
    assert accepted > runs // 2  # candidates were really verified, not just sampled from the root
    tv = total_variation(counts, exact, runs)
    # null distribution of the same statistic: as many samples drawn from the exact distribution
    keys = list(exact)
    probs = torch.tensor([exact[k] for k in keys])
    g = torch.Generator().manual_seed(0)
    null = []
    for _ in range(200):
        draws = torch.multinomial(probs, runs, replacement=True, generator=g).bincount(minlength=len(keys))
        null.append(0.5 * float((draws / runs - probs).abs().sum()))
    threshold = sorted(null)[-2]  # ~99th percentile
    assert tv <= threshold * 1.1, (tv, threshold)


def test_seeded_sampling_is_deterministic() -> None:
    model = cpu_model("qwen2", init=0.3)
    prompt = prompt_ids(14)
    gen = specdec.SpeculativeGenerator(model, method="lookahead", window_size=3, ngram_size=3, guess_size=3)
    a = gen.generate(prompt, max_new_tokens=24, temperature=0.8, seed=123).token_ids
    b = gen.generate(prompt, max_new_tokens=24, temperature=0.8, seed=123).token_ids
    c = (
        specdec.SpeculativeGenerator(model, method="lookahead", window_size=3, ngram_size=3, guess_size=3)
        .generate(prompt, max_new_tokens=24, temperature=0.8, seed=123)
        .token_ids
    )
    assert a == b == c


# ---------------------------------------------------------------- real model


def _real_model_file(name: str) -> Path:
    return Path(os.environ.get("SPECDEC_MODELS", Path.home() / ".cache" / "specdec" / "models")) / name


@pytest.mark.real_model
def test_smollm2_greedy_equals_generate() -> None:
    path = _real_model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path.exists():
        pytest.skip(f"{path} is absent: fetch it with `python shared/models/fetch.py smollm2-135m`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]
    gen = specdec.SpeculativeGenerator(model, tokenizer, method="lookahead")
    ids = gen.encode(messages)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None)[
        0, len(ids) :
    ].tolist()
    out = gen.generate(ids, max_new_tokens=40, eos_token_id=[])
    assert out.token_ids == ref
