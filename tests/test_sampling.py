"""Speculative sampling is lossless: emitted tokens follow the target's distribution exactly.

Two levels: the verifier alone on synthetic distributions (many draws, tight
bounds), and whole generations with tiny models on a small vocabulary against
the exact distribution computed by enumeration. Noise bounds come from
sampling the exact distribution itself with the same number of draws.
"""

from __future__ import annotations


import pytest
import torch

import specdec
from conftest import tiny_model
from specdec.linear import use_few_row_linears
from specdec.proposers.base import Proposal
from specdec.sampling import SamplingConfig, presence_rows, process_logits
from specdec.verify import verify


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def noise_bound(p: torch.Tensor, n: int, trials: int = 200, seed: int = 0) -> float:
    """A high quantile of TV between ``p`` and an empirical histogram of ``n`` draws from ``p``."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(p.expand(trials, -1), n, replacement=True, generator=g)
    hist = torch.zeros(trials, p.numel()).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float)) / n
    return float(0.5 * (hist - p).abs().sum(-1).quantile(0.999)) * 1.15


def histogram(samples: list[int], size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(samples), minlength=size).float() / len(samples)


# ---------------------------------------------------------------- the verifier alone
V = 6
N_VERIFY = 6000


def _dist(seed: int, sharp: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, generator=g) * sharp).softmax(-1)


def test_chain_with_draft_probs_first_token_matches_target():
    """Standard speculative sampling: draft sampled from draft_probs, first emitted token ~ target."""
    target, draft_p = _dist(1), _dist(2)
    logits = torch.stack([target.log(), _dist(3).log()])  # rows: root, node 0
    g = torch.Generator().manual_seed(0)
    n, out = N_VERIFY, []
    for _ in range(n):
        x = int(torch.multinomial(draft_p, 1, generator=g))
        d = Proposal(tokens=torch.tensor([x]), draft_probs=draft_p[None])
        v = verify(d, logits, SamplingConfig(temperature=1.0), torch.tensor([0]), g)
        out.append(x if v.accepted_nodes else v.next_token)
    assert tv(histogram(out, V), target) < noise_bound(target, n)


def test_point_mass_siblings_first_token_matches_target():
    """Recursive rejection over deterministic siblings (n-gram / tree candidates)."""
    target = _dist(4)
    logits = torch.stack([target.log()] + [_dist(10 + i).log() for i in range(3)])
    d = Proposal(tokens=torch.tensor([int(target.argmax()), 0, 5]), parents=torch.tensor([-1, -1, -1]))
    g = torch.Generator().manual_seed(1)
    n, out = N_VERIFY, []
    for _ in range(n):
        v = verify(d, logits, SamplingConfig(temperature=1.0), torch.tensor([0]), g)
        out.append(int(d.tokens[v.accepted_nodes[0]]) if v.accepted_nodes else v.next_token)
    assert tv(histogram(out, V), target) < noise_bound(target, n)


def test_tree_second_token_matches_target_conditional():
    """Depth 2: the first token follows the target, and given it, the second follows the target's row."""
    target0 = _dist(5)
    rows = {0: _dist(6), 1: _dist(7)}  # target distribution after token 0 / token 1
    # tree: [0] -> [0,2] ; [1] -> [1,3]
    d = Proposal(tokens=torch.tensor([0, 1, 2, 3]), parents=torch.tensor([-1, -1, 0, 1]))
    logits = torch.stack([target0.log(), rows[0].log(), rows[1].log(), _dist(8).log(), _dist(9).log()])
    g = torch.Generator().manual_seed(2)
    firsts: list[int] = []
    seconds: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(N_VERIFY):
        v = verify(d, logits, SamplingConfig(temperature=1.0), torch.tensor([0]), g)
        toks = [int(d.tokens[i]) for i in v.accepted_nodes] + [v.next_token]
        firsts.append(toks[0])
        if toks[0] in seconds:
            assert len(toks) >= 2  # an accepted first node always brings a second token
            seconds[toks[0]].append(toks[1])
    assert tv(histogram(firsts, V), target0) < noise_bound(target0, N_VERIFY)
    for a, row in rows.items():
        assert tv(histogram(seconds[a], V), row) < noise_bound(row, len(seconds[a]))


def test_top_k_top_p_processing():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    p = process_logits(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert p[0, :2].sum() == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    p = process_logits(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    assert (p[0] > 0).tolist() == [False, False, False, True]
    presence = presence_rows(torch.tensor([3]), 4)
    x = process_logits(logits, SamplingConfig(repetition_penalty=2.0), presence)
    assert x[0].tolist() == [1.0, 2.0, 3.0, 2.0]


# ---------------------------------------------------------------- whole generations
VOCAB = 8
N_RUNS = 1500


def _exact_two_tokens(target, prompt: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """Exact joint distribution ``[V*V]`` of the first two generated tokens."""
    with torch.no_grad():
        first = process_logits(
            target(torch.tensor([prompt], device=target.device)).logits[0, -1:].cpu(),
            cfg,
            presence_rows(torch.tensor(prompt), VOCAB),
        )[0]
        batch = torch.tensor([prompt + [a] for a in range(VOCAB)], device=target.device)
        logits = target(batch).logits[:, -1].cpu()
        presence = torch.stack([presence_rows(torch.tensor(prompt + [a]), VOCAB)[0] for a in range(VOCAB)])
        second = process_logits(logits, cfg, presence)
    return (first[:, None] * second).reshape(-1)


@pytest.mark.parametrize(
    "method,cfg,few_rows",
    [
        ("draft", SamplingConfig(temperature=1.0), False),
        ("draft", SamplingConfig(temperature=0.8, top_k=5, top_p=0.9), False),
        ("draft", SamplingConfig(temperature=1.0, repetition_penalty=1.5), False),
        ("prompt_lookup", SamplingConfig(temperature=1.0), False),
        # float32 CPU models as load_model gives them (specdec.linear.FewRowLinear)
        ("draft", SamplingConfig(temperature=1.0), True),
        ("prompt_lookup", SamplingConfig(temperature=1.0), True),
    ],
)
def test_generation_distribution_matches_target(method, cfg, few_rows):
    target = tiny_model("llama", seed=0, vocab=VOCAB, sharpness=6.0)
    draft = tiny_model("llama", seed=3, vocab=VOCAB, sharpness=6.0) if method == "draft" else None
    if few_rows:
        for model in (target, draft):
            if model is not None:
                assert use_few_row_linears(model) > 0
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats, so prompt lookup proposes
    gen = specdec.SpeculativeGenerator(target, method=method, draft=draft, num_speculative_tokens=2 if draft else None)
    exact = _exact_two_tokens(target, prompt, cfg)
    samples = []
    for seed in range(N_RUNS):
        ids = gen.generate(
            prompt,
            max_new_tokens=2,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty,
            seed=seed,
        ).token_ids
        samples.append(ids[0] * VOCAB + ids[1])
    hist = histogram(samples, VOCAB * VOCAB)
    assert tv(hist.view(VOCAB, VOCAB).sum(1), exact.view(VOCAB, VOCAB).sum(1)) < noise_bound(
        exact.view(VOCAB, VOCAB).sum(1), N_RUNS
    )
    assert tv(hist, exact) < noise_bound(exact, N_RUNS)


def test_seeded_runs_are_reproducible():
    target = tiny_model("qwen2", seed=0, vocab=VOCAB * 4, sharpness=3.0)
    draft = tiny_model("qwen2", seed=1, vocab=VOCAB * 4, sharpness=3.0)
    prompt = [1, 5, 9, 2, 1, 5]
    kwargs = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    for method in ("none", "draft", "prompt_lookup"):
        gen = specdec.SpeculativeGenerator(target, method=method, draft=draft if method == "draft" else None)
        a, b = gen.generate(prompt, **kwargs).token_ids, gen.generate(prompt, **kwargs).token_ids
        assert a == b
    runs = {tuple(gen.generate(prompt, **dict(kwargs, seed=s)).token_ids) for s in range(5)}
    assert len(runs) > 1  # different seeds explore different continuations
