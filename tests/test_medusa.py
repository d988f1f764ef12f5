"""Medusa heads: tree buffers, lossless decoding, save/load, training, the CLI.

Decoding checks use tiny random models in fp32 with untrained (or randomly
perturbed) heads: the heads' quality only changes speed, never the output.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import specdec
from conftest import DEVICE, hf_greedy, tiny_model
from specdec.costs import CPU_FP32_ROW_COST, CPU_ROW_COST, GPU_ROW_COST, row_cost
from specdec.errors import SpecdecError
from specdec.medusa import MedusaHeads, build_tree, default_tree, tree_from_accuracies
from specdec.medusa.train import TrainConfig, exact_label_mask, head_labels, medusa_loss, train
from specdec.medusa.choices import best_size
from specdec.sampling import SamplingConfig, process_logits

TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def perturbed_heads(
    target, num_heads: int = 3, seed: int = 5, scale: float = 0.3, sequential: bool = False
) -> MedusaHeads:
    """Heads whose blocks are random (a fresh head is the identity), so heads differ from each other."""
    heads = MedusaHeads.init(target, num_heads=num_heads, sequential=sequential)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blocks in heads.blocks:
            for block in blocks:
                block.linear.weight.copy_(torch.randn(block.linear.weight.shape, generator=g) * scale)
    return heads


# ---------------------------------------------------------------- tree buffers
def test_tree_buffers_table():
    t = build_tree([[1], [0, 0], [0], [0, 1], [1, 0], [0, 0, 0]])  # any order in, tree order out
    assert t.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert t.parents.tolist() == [-1, -1, 0, 0, 1, 2]
    assert t.head_index.tolist() == [0, 0, 1, 1, 1, 2]
    assert t.rank.tolist() == [0, 1, 0, 1, 0, 0]
    assert t.depths.tolist() == [1, 1, 2, 2, 2, 3]
    assert t.position_offsets.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.topk == 2 and t.max_depth == 3 and t.num_nodes == 6
    assert t.attn_mask.int().tolist() == [
        # root n0 n1 n2 n3 n4 n5
        [1, 0, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0, 0],  # [0]
        [1, 0, 1, 0, 0, 0, 0],  # [1]
        [1, 1, 0, 1, 0, 0, 0],  # [0,0]
        [1, 1, 0, 0, 1, 0, 0],  # [0,1]
        [1, 0, 1, 0, 0, 1, 0],  # [1,0]
        [1, 1, 0, 1, 0, 0, 1],  # [0,0,0]
    ]
    # leaves [0,1], [1,0], [0,0,0] (in tree order); rows on each root-to-leaf path
    assert t.retrieve_indices.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]


@pytest.mark.parametrize("bad", [[[0, 0]], [[0], [0]], [[]], [[-1]], [["a"]]])
def test_invalid_trees_are_refused(bad):
    with pytest.raises(SpecdecError):
        build_tree(bad)


def test_default_tree_fits_heads_and_is_valid():
    for k in (1, 2, 3, 4, 5):
        t = build_tree(default_tree(k))
        assert t.max_depth <= k and 1 <= t.num_nodes <= 16


def test_row_cost_is_measured_on_the_target_per_row_count():
    """Every row count is timed (interleaved rounds, fastest kept);
    relative costs start at 1.0 and never fall with more rows."""
    from specdec.costs import forward_cost, measure_row_cost

    target = tiny_model("qwen2", vocab=64)
    seconds = forward_cost(target, rows=(1, 3, 6), prompt_length=10, repeats=2)
    assert list(seconds) == [1, 3, 6] and all(v > 0 for v in seconds.values())
    costs = measure_row_cost(target, rows=(1, 2, 4), context=8, repeats=2)
    assert costs[1] == 1.0 and costs[1] <= costs[2] <= costs[4]


def test_tree_from_accuracies_prefers_likely_paths_and_stops_when_cost_wins():
    acc = [[0.6, 0.15, 0.05], [0.4, 0.1], [0.3]]
    tree, expected = tree_from_accuracies(acc, max_nodes=5, cost=lambda r: 1.0)  # free rows: take all 5
    # best-first by path probability: [0] .6, [0,0] .24, [1] .15, [0,0,0] .072, then [0,1] or [1,0] (.06 each)
    assert tree[:3] == [[0], [1], [0, 0]] and [0, 0, 0] in tree and len(tree) == 5
    assert expected == pytest.approx(1 + 0.6 + 0.24 + 0.15 + 0.072 + 0.06)
    build_tree(tree)  # valid
    tree, expected = tree_from_accuracies(acc, max_nodes=64, cost=lambda r: float(r))  # rows cost linearly: none pays
    assert tree == [] and expected == 1.0
    assert row_cost(16) == pytest.approx(1.32) and row_cost(24) == pytest.approx((1.32 + 1.78) / 2)


# ---------------------------------------------------------------- greedy: lossless
@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_generate(arch, sequential):
    target = tiny_model(arch, seed=0, vocab=96, sharpness=3.0)
    prompt = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_greedy(target, prompt, 32)
    wide = [[i] for i in range(12)] + [[0, j] for j in range(6)] + [[1, j] for j in range(3)] + [[0, 0, 0], [0, 0, 1]]
    accepted = 0
    fresh = MedusaHeads.init(target, num_heads=3, sequential=sequential)
    perturbed = perturbed_heads(target, sequential=sequential)
    dynamic = [{}, {"size_by_cost": False, "tree_size": 12}, {"size_by_cost": False, "tree_size": 1}]
    cases = [
        (fresh, {"tree": TREE}),
        (fresh, {"tree": wide}),
        (perturbed, {"dynamic_tree": False}),
        (perturbed, {"tree": [[0], [1], [2]]}),
        (perturbed, {"tree": [[0], [0, 0], [0, 0, 0]]}),
        (perturbed, {"tree": wide}),
    ] + [(heads, d) for heads in (fresh, perturbed) for d in dynamic]
    for heads, options in cases:
        gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, **options)
        res = gen.generate(prompt, max_new_tokens=32)
        assert res.token_ids == ref, (options, res.token_ids, ref)
        accepted += res.stats.accepted
    assert accepted > 0  # the tree paths were exercised, not only the root


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_and_without_context_copies_equals_generate(arch):
    target = tiny_model(arch, seed=0, vocab=96, sharpness=3.0)
    base = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    prompt = base + hf_greedy(target, base, 24) + base  # the text repeats: copies have something to offer
    ref = hf_greedy(target, prompt, 40)
    heads = perturbed_heads(target)
    steps = {}
    for copy_tokens in (0, 4, 32):
        gen = specdec.SpeculativeGenerator(
            target, method="medusa", medusa_heads=heads, tree=TREE, copy_tokens=copy_tokens
        )
        res = gen.generate(prompt, max_new_tokens=40)
        assert res.token_ids == ref, copy_tokens
        steps[copy_tokens] = res.stats.steps
    assert steps[32] < steps[0]  # the copies were verified and kept, not only the heads' guesses


def test_copies_merge_with_the_tree_and_replace_it_while_hot():
    target = tiny_model("llama", vocab=32)
    gen = specdec.SpeculativeGenerator(
        target,
        method="medusa",
        medusa_heads=MedusaHeads.init(target, num_heads=2),
        tree=[[0], [1], [0, 0]],
        copy_tokens=4,
    )
    proposer = gen.proposer
    state = specdec.engine.DecodeState(
        tokens=torch.tensor([5, 6, 7, 8, 9, 5, 6]), prompt_length=7, sampling=SamplingConfig(), generator=None
    )
    proposer.reset(state)
    first = proposer.propose(state, 10)  # no hidden state yet: the copy alone (suffix 5 6 seen at 0)
    assert first.tokens.tolist() == [7, 8, 9, 5] and first.parents.tolist() == [-1, 0, 1, 2] and first.need_hidden
    proposer._guesses = ([7, 3, 4], [-1, -1, 0], None)  # nodes [0], [1], [0, 0]
    draft = proposer.propose(state, 10)
    # copy 7 8 9 5 first, then the tree's leaf paths in tree order: 3, and 7 4 (4 merged below the copy's 7)
    assert draft.tokens.tolist() == [7, 8, 9, 5, 3, 4]
    assert draft.parents.tolist() == [-1, 0, 1, 2, -1, 0]
    assert proposer.propose(state, 2).tokens.tolist() == [7, 8, 3, 4]  # depth capped at max_nodes
    proposer.copies.hot = True  # the last copy was kept: this step sends the copy alone
    assert proposer.propose(state, 10).tokens.tolist() == [7, 8, 9, 5]
    with pytest.raises(SpecdecError, match="copy_tokens"):
        specdec.SpeculativeGenerator(
            target, method="medusa", medusa_heads=MedusaHeads.init(target, num_heads=2), copy_tokens=-1
        )


def test_first_step_asks_for_hidden_states():
    target = tiny_model("llama", vocab=32)
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=MedusaHeads.init(target, num_heads=2))
    state = specdec.engine.DecodeState(
        tokens=torch.tensor([1, 2, 3]), prompt_length=3, sampling=SamplingConfig(), generator=None
    )
    gen.proposer.reset(state)
    draft = gen.proposer.propose(state, 10)
    assert draft.num_nodes == 0 and draft.need_hidden


# ---------------------------------------------------------------- sampling: lossless
VOCAB = 8
N_RUNS = 600


def _exact_tokens_2_3(target, prompt: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """Exact joint distribution ``[V*V]`` of the 2nd and 3rd generated tokens (1st marginalised)."""
    with torch.no_grad():
        dev = target.device
        p1 = process_logits(target(torch.tensor([prompt], device=dev)).logits[0, -1:], cfg)[0]  # [V]
        b2 = torch.tensor([prompt + [a] for a in range(VOCAB)], device=dev)
        p2 = process_logits(target(b2).logits[:, -1], cfg)  # [V(a), V(b)]
        b3 = torch.tensor([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)], device=dev)
        p3 = process_logits(target(b3).logits[:, -1], cfg).view(VOCAB, VOCAB, VOCAB)  # [a, b, c]
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return joint.sum(0).reshape(-1).cpu()


@pytest.mark.parametrize(
    "copy_tokens, sequential, dynamic",
    [(0, False, False), (32, False, False), (0, True, False), (0, True, True), (32, False, True)],
)
def test_sampling_distribution_matches_target(copy_tokens, sequential, dynamic):
    """Fixed trees, per-step (dynamic) trees and context copies all sample exactly from the target."""
    from test_sampling import histogram, noise_bound, tv

    target = tiny_model("llama", seed=0, vocab=VOCAB, sharpness=6.0)
    heads = perturbed_heads(target, num_heads=2, sequential=sequential)
    tree = {"size_by_cost": False, "tree_size": 4} if dynamic else {"tree": [[0], [1], [0, 0], [2]]}
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, copy_tokens=copy_tokens, **tree)
    cfg = SamplingConfig(temperature=1.0)
    prompt = [1, 2, 3, 1, 2]
    exact = _exact_tokens_2_3(target, prompt, cfg)
    samples, accepted = [], 0
    for seed in range(N_RUNS):
        res = gen.generate(prompt, max_new_tokens=4, temperature=1.0, seed=seed)
        samples.append(res.token_ids[1] * VOCAB + res.token_ids[2])
        accepted += res.stats.accepted
    assert accepted > N_RUNS // 4  # candidates were accepted often, so the rejection path matters
    hist = histogram(samples, VOCAB * VOCAB)
    assert tv(hist, exact) < noise_bound(exact, N_RUNS)


def test_seeded_sampling_is_reproducible():
    target = tiny_model("qwen2", seed=0, vocab=32, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=perturbed_heads(target), tree=TREE)
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=77)
    assert gen.generate([1, 5, 9, 2], **kw).token_ids == gen.generate([1, 5, 9, 2], **kw).token_ids
    assert len({tuple(gen.generate([1, 5, 9, 2], **dict(kw, seed=s)).token_ids) for s in range(5)}) > 1


# ---------------------------------------------------------------- typical acceptance (opt-in, LOSSY)
def _typical_draft():
    from specdec.proposers.base import Proposal

    # root -> a(0) -> c(2); root -> b(1) -> d(3), b -> e(4)
    return Proposal(tokens=torch.tensor([1, 2, 3, 4, 5]), parents=torch.tensor([-1, -1, 0, 1, 1]))


def _rows(*dists: dict[int, float], vocab: int = 8) -> torch.Tensor:
    """Logits ``[len(dists), vocab]`` whose softmax is the given distributions (rest near zero)."""
    probs = torch.full((len(dists), vocab), 1e-9)
    for i, d in enumerate(dists):
        for t, v in d.items():
            probs[i, t] = v
    return torch.log(probs / probs.sum(-1, keepdim=True))


def test_typical_acceptance_rule_table():
    from specdec.verify import TypicalAcceptance, verify

    draft = _typical_draft()
    typical = TypicalAcceptance(posterior_threshold=0.09, posterior_alpha=0.3)
    cfg = SamplingConfig(temperature=1.0)
    ctx = torch.tensor([0])
    cases = [
        # root: a 0.5, b 0.4; a's row: c 0.05 (fails); b's row: d 0.6, e 0.3 -> longest path b->d
        (
            (
                _rows({1: 0.5, 2: 0.4, 7: 0.1}),
                _rows({3: 0.05, 7: 0.95}),
                _rows({4: 0.6, 5: 0.3, 7: 0.1}),
                _rows({7: 1.0}),
                _rows({7: 1.0}),
                _rows({7: 1.0}),
            ),
            [1, 3],
        ),
        # both depth-2 paths pass: the likelier one wins (a->c: 0.5*0.9 > b->d: 0.4*0.6)
        (
            (
                _rows({1: 0.5, 2: 0.4, 7: 0.1}),
                _rows({3: 0.9, 7: 0.1}),
                _rows({4: 0.6, 5: 0.3, 7: 0.1}),
                _rows({7: 1.0}),
                _rows({7: 1.0}),
                _rows({7: 1.0}),
            ),
            [0, 2],
        ),
        # nothing at the root is likely enough: no candidate accepted
        (
            (
                _rows({1: 0.05, 2: 0.05, 7: 0.9}),
                _rows({3: 1.0}),
                _rows({4: 1.0}),
                _rows({7: 1.0}),
                _rows({7: 1.0}),
                _rows({7: 1.0}),
            ),
            [],
        ),
    ]
    for rows, expected in cases:
        logits = torch.cat(rows)  # [1+n, V]
        v = verify(draft, logits, cfg, ctx, torch.Generator().manual_seed(0), typical=typical)
        assert v.accepted_nodes == expected
        assert v.last_row == (expected[-1] + 1 if expected else 0)
        if not expected:
            assert v.next_token == 7  # sampled from the root row, where 7 holds ~all the mass
        # greedy ignores typical acceptance: exactly the greedy verdict
        g = SamplingConfig()
        assert verify(draft, logits, g, ctx, typical=typical) == verify(draft, logits, g, ctx)
    # the entropy term: a flat row lowers the threshold below posterior_threshold
    flat = torch.full((1, 100), 0.01)
    assert float(typical.thresholds(flat)[0]) == pytest.approx(0.3 * 0.01, rel=1e-3)


def test_typical_acceptance_is_off_by_default_and_validated():
    target = tiny_model("llama", vocab=32)
    heads = MedusaHeads.init(target, num_heads=2)
    assert specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads).typical_acceptance is None
    on = specdec.SpeculativeGenerator(
        target,
        method="medusa",
        medusa_heads=heads,
        typical_acceptance=True,
        posterior_threshold=0.2,
        posterior_alpha=0.5,
    )
    assert (on.typical_acceptance.posterior_threshold, on.typical_acceptance.posterior_alpha) == (0.2, 0.5)
    with pytest.raises(SpecdecError, match="only apply with typical acceptance"):
        specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, posterior_threshold=0.2)
    with pytest.raises(SpecdecError, match="posterior_threshold"):
        specdec.SpeculativeGenerator(
            target, method="medusa", medusa_heads=heads, typical_acceptance=True, posterior_threshold=1.5
        )
    with pytest.raises(SpecdecError, match="do not apply"):
        specdec.SpeculativeGenerator(target, method="prompt_lookup", typical_acceptance=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_typical_acceptance_output_is_well_formed_and_seeded(arch):
    target = tiny_model(arch, seed=0, vocab=32, sharpness=4.0)
    heads = perturbed_heads(target)
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, tree=TREE, typical_acceptance=True)
    prompt = [1, 5, 9, 2]
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=11, eos_token_id=[])
    first = gen.generate(prompt, **kw)
    assert len(first.token_ids) == 24 and first.finish_reason == "length"
    assert all(0 <= t < 32 for t in first.token_ids)
    assert first.stats.new_tokens == 24
    assert gen.generate(prompt, **kw).token_ids == first.token_ids  # seeded: reproducible
    assert len({tuple(gen.generate(prompt, **dict(kw, seed=s)).token_ids) for s in range(5)}) > 1
    # greedy stays exact with typical acceptance on
    assert gen.generate(prompt, max_new_tokens=16).token_ids == hf_greedy(target, prompt, 16)


def test_typical_acceptance_accepts_plausible_candidates_that_exact_sampling_may_reject():
    """On a peaked model typical acceptance keeps at least as many candidates per step as exact sampling."""
    target = tiny_model("llama", seed=0, vocab=VOCAB, sharpness=6.0)
    heads = perturbed_heads(target, num_heads=2)
    tree = [[0], [1], [0, 0], [2]]
    # copy_tokens=0: this checks the heads' tree alone
    exact = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, tree=tree, copy_tokens=0)
    typical = specdec.SpeculativeGenerator(
        target,
        method="medusa",
        medusa_heads=heads,
        tree=tree,
        copy_tokens=0,
        typical_acceptance=True,
        posterior_threshold=0.0,
        posterior_alpha=0.0,
    )
    prompt = [1, 2, 3, 1, 2]
    # threshold 0: every candidate the target gives any mass passes, so every step accepts a full path
    res = typical.generate(prompt, max_new_tokens=30, temperature=1.0, seed=3, eos_token_id=[])
    assert (
        res.stats.mean_accepted_length
        > exact.generate(prompt, max_new_tokens=30, temperature=1.0, seed=3, eos_token_id=[]).stats.mean_accepted_length
    )
    assert res.stats.steps == 1 + -(-29 // 3)  # the first step has no hidden state; then depth-2 paths + 1


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    target = tiny_model("llama", vocab=64)
    heads = perturbed_heads(target, num_heads=3)
    heads.config.tree = [[0], [1], [0, 0]]
    heads.save(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "medusa_config.json").read_text())
    assert cfg["num_heads"] == 3 and cfg["vocab_size"] == 64 and cfg["hidden_size"] == 32 and cfg["fingerprint"]
    loaded = MedusaHeads.from_pretrained(tmp_path / "h", target)
    h = torch.randn(5, 32, device=target.device)
    torch.testing.assert_close(loaded(h), heads(h))
    assert loaded.config.tree == [[0], [1], [0, 0]]
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=str(tmp_path / "h"))
    assert gen.proposer.tree.num_nodes == 3  # the stored tree is the default


def test_sequential_tree_tokens_follow_each_path():
    """Each node's token is what the teacher-forced heads (as trained) guess after the path above it."""
    target = tiny_model("qwen2", vocab=64, sharpness=3.0)
    heads = perturbed_heads(target, num_heads=3, sequential=True, scale=0.5)
    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]])
    hidden, root = torch.randn(32, device=target.device), 7
    tokens = heads.tree_tokens(hidden, root, tree).tolist()
    for i, path in enumerate(tree.choices):
        above = [tokens[tree.choices.index(path[:d])] for d in range(1, len(path))]
        prev = torch.tensor([root, *above] + [0] * (3 - len(path)), device=target.device)  # padding is read after
        with torch.no_grad():
            logits = heads(hidden, prev)  # [K, V]
        assert tokens[i] == int(logits[len(path) - 1].topk(path[-1] + 1).indices[-1]), path
    # the guesses depend on the path: two siblings' children differ somewhere (they would not for plain heads)
    assert len({tokens[3], tokens[5], tokens[6]}) > 1  # children [0, 0], [1, 0], [2, 0]
    with pytest.raises(SpecdecError, match="tree_tokens"):
        heads.topk(hidden, 2)
    with pytest.raises(SpecdecError, match="prev"):
        heads(hidden)


@pytest.mark.parametrize("sequential", [False, True])
def test_dynamic_tree_keeps_the_likeliest_paths_best_first(sequential):
    """Each node's probability is the product of the heads' softmax along its path (teacher-forced),
    nodes come best first with every prefix a tree, and no expanded candidate left out beats one kept."""
    target = tiny_model("qwen2", vocab=64, sharpness=3.0)
    heads = perturbed_heads(target, num_heads=3, sequential=sequential, scale=0.5)
    hidden, root = torch.randn(32, device=target.device), 7
    tokens, parents, probs = heads.dynamic_tree(hidden, root, 10, branch=3, beam=2)
    assert len(tokens) == len(parents) == len(probs) == 10
    assert all(p < i for i, p in enumerate(parents))  # a parent before its children: every prefix is a tree
    assert probs == sorted(probs, reverse=True)

    def path(i: int) -> list[int]:
        return (path(parents[i]) if parents[i] >= 0 else []) + [tokens[i]]

    for i in range(len(tokens)):
        p = path(i)
        expected = 1.0
        for d, t in enumerate(p):
            prev_d = torch.tensor([root, *p[:d]] + [0] * (2 - d), device=target.device)
            with torch.no_grad():
                dist = torch.softmax(heads(hidden, prev_d).float(), dim=-1)  # [K, V] teacher-forced on the path
            assert t in dist[d].topk(3).indices.tolist()  # among its head's `branch` best after that path
            expected *= float(dist[d, t])
        assert probs[i] == pytest.approx(expected, rel=1e-4), p
    with torch.no_grad():
        first = heads(hidden, torch.tensor([root, 0, 0], device=target.device))[0].argmax()
    assert tokens[0] == int(first) and parents[0] == -1
    fewer = heads.dynamic_tree(hidden, root, 4, branch=3, beam=2)
    assert fewer == (tokens[:4], parents[:4], probs[:4])  # a smaller tree is a prefix of a bigger one
    assert heads.dynamic_tree(hidden, root, 0) == ([], [], [])


def test_best_size_weighs_expected_tokens_against_row_cost():
    flat = lambda rows: 1.0  # noqa: E731
    assert best_size([0.9, 0.5, 0.01], flat) == 3  # free rows: take everything that may be accepted
    steep = lambda rows: float(rows)  # noqa: E731
    assert best_size([0.9, 0.5], steep) == 0  # each row costs a whole forward: never worth it
    table = lambda rows: row_cost(rows, {1: 1.0, 2: 1.1, 4: 1.3})  # noqa: E731
    # (1 + 0.9) / 1.1 = 1.73, (1 + 1.4) / 1.2 = 2.0, (1 + 1.45) / 1.3 = 1.88
    assert best_size([0.9, 0.5, 0.05], table) == 2
    assert best_size([], table) == 0


def test_row_cost_model_learns_this_machines_cost_per_row():
    from specdec.costs import RowCostModel

    prior = lambda rows: row_cost(rows, CPU_ROW_COST)  # noqa: E731
    model = RowCostModel(prior=prior)
    assert model(16) == pytest.approx(CPU_ROW_COST[16])  # nothing measured: the table
    steeper = lambda rows: 0.22 * prior(rows) + 0.004 * (rows - 1)  # noqa: E731  (16 rows: 1.59x one)
    for i in range(40):
        rows = (1, 4, 9, 16, 25)[i % 5]
        model.record(rows, steeper(rows))
    assert model(16) == pytest.approx(steeper(16) / steeper(1), rel=0.03) and model(1) == pytest.approx(1.0)
    model.start(deterministic=True)  # seeded sampling: decisions must not depend on timings
    assert model(16) == pytest.approx(CPU_ROW_COST[16])
    model.start(deterministic=False)
    assert model(16) == pytest.approx(steeper(16) / steeper(1), rel=0.03)  # measurements carry over generations

    same = RowCostModel(prior=prior)
    for _ in range(20):  # every step the same size: the level is measured, the slope is the table's
        same.record(8, 0.3)
    assert [same(r) for r in (8, 16, 64)] == pytest.approx([prior(8), prior(16), prior(64)], rel=0.01)
    noisy = RowCostModel(prior=prior)
    for i in range(20):  # noise suggesting rows are free makes no row count cheaper than one
        noisy.record((1, 20)[i % 2], (0.3, 0.2)[i % 2])
    assert min(noisy(r) for r in (1, 8, 32)) == pytest.approx(1.0)


def test_medusa_sizes_trees_by_measured_cost_except_when_seeded_sampling():
    target = tiny_model("qwen2", seed=0, vocab=32, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=perturbed_heads(target))
    model = gen.proposer.row_cost
    gen.generate([1, 5, 9, 2], max_new_tokens=16)
    assert model.samples >= 1 and not model.deterministic  # every step after the prompt's is measured
    kw = dict(max_new_tokens=16, temperature=0.9, seed=3)
    first = gen.generate([1, 5, 9, 2], **kw).token_ids
    assert model.deterministic and gen.generate([1, 5, 9, 2], **kw).token_ids == first


def test_dynamic_tree_options_are_validated():
    target = tiny_model("llama", vocab=32)
    heads = MedusaHeads.init(target, num_heads=3)
    with pytest.raises(SpecdecError, match="either a fixed tree or dynamic_tree"):
        specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, tree=TREE, dynamic_tree=True)
    with pytest.raises(SpecdecError, match="size_by_cost"):
        specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, size_by_cost="yes")
    fixed = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, tree=TREE).proposer
    assert fixed.dynamic_nodes is None  # a tree given: that fixed tree
    per_step = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads, tree_size=5).proposer
    assert per_step.dynamic_nodes == 5 and per_step.row_cost is not None
    # the cost per row of this target's compute (on a CPU: float32's) sizes each tree
    table = GPU_ROW_COST if DEVICE.type == "cuda" else CPU_FP32_ROW_COST
    assert per_step.row_cost(16) == pytest.approx(table[16])


def test_sequential_heads_save_and_load(tmp_path):
    target = tiny_model("llama", vocab=64)
    heads = perturbed_heads(target, num_heads=2, sequential=True)
    heads.save(tmp_path / "q")
    loaded = MedusaHeads.from_pretrained(tmp_path / "q", target)
    assert loaded.config.sequential and loaded.blocks[0][0].linear.in_features == 64
    h, prev = torch.randn(4, 32, device=target.device), torch.randint(0, 64, (4, 2), device=target.device)
    torch.testing.assert_close(loaded(h, prev), heads(h, prev))


def test_token_subset_and_own_lm_head(tmp_path):
    target = tiny_model("qwen2", vocab=64, sharpness=3.0)
    subset = torch.tensor([3, 7, 9, 20, 40, 63])
    heads = MedusaHeads.init(target, num_heads=2, own_lm_head=True, token_subset=subset)
    top = heads.topk(torch.randn(32, device=target.device), 3)
    assert top.shape == (2, 3) and set(top.flatten().tolist()) <= set(subset.tolist())
    heads.save(tmp_path / "s")
    loaded = MedusaHeads.from_pretrained(tmp_path / "s", target)
    assert loaded.token_subset.tolist() == subset.tolist() and loaded.proj is not None
    prompt = [1, 2, 3, 4]
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=loaded, tree=TREE[:3])
    assert gen.generate(prompt, max_new_tokens=20).token_ids == hf_greedy(target, prompt, 20)


def test_heads_for_another_target_are_refused(tmp_path):
    target = tiny_model("llama", seed=0, vocab=64)
    MedusaHeads.init(target, num_heads=2).save(tmp_path / "h")
    same_shape_other_weights = tiny_model("llama", seed=9, vocab=64)
    with pytest.raises(SpecdecError, match="trained for"):
        MedusaHeads.from_pretrained(tmp_path / "h", same_shape_other_weights)
    with pytest.raises(SpecdecError, match="vocabulary"):
        MedusaHeads.from_pretrained(tmp_path / "h", tiny_model("llama", seed=0, vocab=80))
    with pytest.raises(SpecdecError, match="trained for"):
        specdec.SpeculativeGenerator(
            same_shape_other_weights, method="medusa", medusa_heads=MedusaHeads.init(target, num_heads=2)
        )
    with pytest.raises(SpecdecError, match="needs Medusa heads"):
        specdec.SpeculativeGenerator(target, method="medusa")
    with pytest.raises(SpecdecError, match="deep"):
        specdec.SpeculativeGenerator(
            target, method="medusa", medusa_heads=MedusaHeads.init(target, num_heads=1), tree=[[0], [0, 0]]
        )
    with pytest.raises(SpecdecError, match="no Medusa heads"):
        MedusaHeads.from_pretrained(tmp_path, target)
    with pytest.raises(SpecdecError, match="heads folder not found"):
        MedusaHeads.from_pretrained(tmp_path / "nothing here", target)
    with pytest.raises(SpecdecError, match="is a file, not a folder"):
        MedusaHeads.from_pretrained(tmp_path / "h" / "medusa_config.json", target)


def _published_state(num_heads: int, num_layers: int, hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    state = {}
    for i in range(num_heads):
        for j in range(num_layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=g) * 0.1
            state[f"{i}.{j}.linear.bias"] = torch.randn(hidden, generator=g) * 0.1
        state[f"{i}.{num_layers}.weight"] = torch.randn(vocab, hidden, generator=g)
    return state


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_published_layout(tmp_path, fmt):
    target = tiny_model("llama", vocab=64)
    state = _published_state(num_heads=3, num_layers=2, hidden=32, vocab=64)
    (tmp_path / "config.json").write_text(
        json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 2, "base_model_name_or_path": "tiny/llama"})
    )
    if fmt == "pt":
        torch.save(state, tmp_path / "medusa_lm_head.pt")
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    heads = MedusaHeads.from_pretrained(tmp_path, target)
    assert heads.config.num_heads == 3 and heads.config.num_layers == 2 and heads.config.own_lm_head
    h = torch.randn(4, 32)
    expected = []
    for i in range(3):
        z = h
        for j in range(2):
            z = z + torch.nn.functional.silu(z @ state[f"{i}.{j}.linear.weight"].T + state[f"{i}.{j}.linear.bias"])
        expected.append(z @ state[f"{i}.2.weight"].T)
    torch.testing.assert_close(heads(h.to(target.device)).cpu(), torch.stack(expected, dim=1))
    prompt = [5, 6, 7]
    gen = specdec.SpeculativeGenerator(target, method="medusa", medusa_heads=heads)
    assert gen.generate(prompt, max_new_tokens=16).token_ids == hf_greedy(target, prompt, 16)


class _NotATensor:
    pass


def test_published_pickle_with_objects_is_refused(tmp_path):
    target = tiny_model("llama", vocab=64)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 1, "medusa_num_layers": 1}))
    torch.save({"0.0.linear.weight": _NotATensor()}, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(SpecdecError, match="refusing"):
        MedusaHeads.from_pretrained(tmp_path, target)


def test_published_layout_for_another_vocabulary_is_refused(tmp_path):
    target = tiny_model("llama", vocab=64)
    (tmp_path / "config.json").write_text(
        json.dumps({"medusa_num_heads": 1, "medusa_num_layers": 1, "base_model_name_or_path": "org/big"})
    )
    torch.save(_published_state(1, 1, 32, 100), tmp_path / "medusa_lm_head.pt")
    with pytest.raises(SpecdecError, match="org/big"):
        MedusaHeads.from_pretrained(tmp_path, target)


# ---------------------------------------------------------------- training
class ByteTokenizer:
    """Bytes as tokens (vocabulary 256 + EOS 0), no chat template."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [b or 1 for b in text.encode()]}


def _corpus(tmp_path: Path) -> Path:
    data = tmp_path / "corpus"
    data.mkdir()
    # a few standard-library modules: text that does not change when this project's files do
    src = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "fnmatch.py", "graphlib.py", "heapq.py", "shlex.py", "textwrap.py"):
        (data / name).write_text((src / name).read_text())
    return data


SMALL_RUN = dict(
    num_heads=2, seq_len=48, cache_tokens=480, batch_size=32, subset_size=100, measure_cost=False, chat_wrap=False
)
"""A small run's :class:`TrainConfig` fields (heads over a token subset), less its steps and checkpoints."""

LOSS_RUN = dict(num_heads=3, steps=60, seq_len=64, cache_tokens=1024, batch_size=64, lr=2e-2, eval_fraction=0.0)
"""A run long enough to lower the loss clearly, every position trained (no held-out windows)."""


def _train_config(**fields) -> TrainConfig:
    """A :class:`TrainConfig` with ``fields``; by default the whole vocabulary, no chat template, no timing of
    forwards, a checkpoint only at the end."""
    return TrainConfig(**{"subset_size": 0, "chat_wrap": False, "measure_cost": False, "checkpoint_every": 0, **fields})


def _cached_positions(target, out: Path, num_heads: int, sequential: bool = False):
    """The hidden states, (for sequential heads) the tokens the heads read, and the labels of every position
    in the feature cache of a run into ``out``, moved from the CPU to where the target (and so the heads) is."""
    from safetensors.torch import load_file

    from specdec.medusa.train import head_inputs

    feats = load_file(str(out / "cache" / "features.safetensors"))
    pos, labels = head_labels(feats["preds"], num_heads, 0)
    prev = head_inputs(feats["preds"], pos, num_heads).to(target.device) if sequential else None
    return feats["hidden"][pos[:, 0], pos[:, 1]].to(target.device), prev, labels.to(target.device)


def _loss(heads, hidden, prev, labels, cfg: TrainConfig) -> float:
    """The training loss of ``heads`` on these positions (``prev``: what sequential heads read, else None)."""
    with torch.no_grad():
        loss, _ = medusa_loss(heads(hidden) if prev is None else heads(hidden, prev), labels, cfg.distance_decay)
    return float(loss)


def test_training_lowers_the_loss(tmp_path):
    target = tiny_model("llama", vocab=256, sharpness=4.0)
    cfg = _train_config(**LOSS_RUN)
    losses = []
    heads, report = train(
        target,
        ByteTokenizer(),
        _corpus(tmp_path),
        tmp_path / "out",
        cfg,
        progress=lambda p: losses.append(p.loss) if p.loss is not None else None,
    )
    hidden, _, labels = _cached_positions(target, tmp_path / "out", 3)
    fresh = MedusaHeads.init(target, num_heads=3)
    before = _loss(fresh, hidden, None, labels, cfg)
    after = _loss(heads.float(), hidden, None, labels, cfg)
    assert after < 0.85 * before
    assert len(losses) == 60 and (tmp_path / "out" / "medusa_config.json").is_file()
    assert len(report["top1"]) == 3


def test_training_sequential_heads(tmp_path):
    target = tiny_model("llama", vocab=256, sharpness=4.0)
    cfg = _train_config(**LOSS_RUN, checkpoint_every=30, sequential=True)
    data = _corpus(tmp_path)
    heads, report = train(target, ByteTokenizer(), data, tmp_path / "out", cfg)
    hidden, prev, labels = _cached_positions(target, tmp_path / "out", 3, sequential=True)
    assert torch.equal(prev[:, 1:], labels[:, :-1])  # head k reads the token head k-1 guesses
    fresh = MedusaHeads.init(target, num_heads=3, sequential=True)
    before = _loss(fresh, hidden, prev, labels, cfg)
    after = _loss(heads.float(), hidden, prev, labels, cfg)
    assert after < 0.85 * before
    assert MedusaHeads.from_pretrained(tmp_path / "out", target).config.sequential and len(report["top1"]) == 3
    with pytest.raises(SpecdecError, match="sequential"):  # a plain run cannot resume sequential heads
        train(
            target,
            ByteTokenizer(),
            data,
            tmp_path / "out",
            TrainConfig(**{**cfg.__dict__, "steps": 90, "sequential": False}),
            resume=True,
        )


def test_training_is_seeded_and_resumes(tmp_path):
    target = tiny_model("qwen2", vocab=256, sharpness=4.0)
    data = _corpus(tmp_path)
    a, _ = train(target, ByteTokenizer(), data, tmp_path / "a", TrainConfig(steps=12, checkpoint_every=0, **SMALL_RUN))
    # 6 steps, checkpoint at 6 is not written (last step); so run 12 with a checkpoint at 6 and stop there by resume
    b, _ = train(target, ByteTokenizer(), data, tmp_path / "b", TrainConfig(steps=12, checkpoint_every=6, **SMALL_RUN))
    h = torch.randn(3, 32, device=target.device)
    torch.testing.assert_close(a.float()(h), b.float()(h))
    state = torch.load(tmp_path / "b" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 12
    c, rep = train(
        target,
        ByteTokenizer(),
        data,
        tmp_path / "b",
        TrainConfig(steps=14, checkpoint_every=0, **SMALL_RUN),
        resume=True,
    )
    assert rep["steps_run"] == 2 and rep["cache_seconds"] < 5  # resumed from step 12, cached states reused


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    target = tiny_model("qwen2", vocab=256, sharpness=4.0)
    data = _corpus(tmp_path)
    cfg = TrainConfig(steps=8, checkpoint_every=0, **SMALL_RUN)
    fresh, _ = train(target, ByteTokenizer(), data, tmp_path / "fresh", cfg)
    resumed, rep = train(target, ByteTokenizer(), data, tmp_path / "resumed", cfg, resume=True)
    assert rep["steps_run"] == 8
    h = torch.randn(3, 32, device=target.device)
    torch.testing.assert_close(resumed.float()(h), fresh.float()(h), rtol=0, atol=0)


# ---------------------------------------------------------------- the CLI
def _tiny_folder(tmp_path: Path) -> Path:
    """A tiny Llama saved with a byte-level tokenizer, loadable by ``specdec.loading.load_model``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    folder = tmp_path / "tiny"
    model = tiny_model("llama", vocab=len(vocab), sharpness=3.0)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_cli_train_medusa(tmp_path):
    from click.testing import CliRunner

    from specdec.cli import main

    folder = _tiny_folder(tmp_path)
    data = _corpus(tmp_path)
    out = tmp_path / "heads"
    args = [
        "train-medusa",
        "--target",
        str(folder),
        "--data",
        str(data),
        "--out",
        str(out),
        "--heads",
        "2",
        "--steps",
        "4",
        "--seq-len",
        "32",
        "--cache-tokens",
        "256",
        "--batch-size",
        "16",
        "--subset-size",
        "0",
        "--answers",
        "2",
        "--answer-batch",
        "2",
        "--dtype",
        "float32",
        "--checkpoint-every",
        "2",
    ]
    runner = CliRunner()
    res = runner.invoke(main, args, env={"COLUMNS": "60"})  # a narrow log: rich would wrap lines at its width
    assert res.exit_code == 0, res.output
    assert "held-out top-1 accuracy" in res.output
    assert "training heads: 4/4 after" in res.output  # no terminal: plain progress lines
    line = next(line for line in res.output.splitlines() if "training heads: 4/4 after" in line)
    assert "lr " in line and "e-0" in line  # one line per report, not wrapped at the width
    assert "━" not in res.output  # and no last frame of the bar in a log file
    assert (out / "medusa_heads.safetensors").is_file() and (out / "checkpoint" / "train_state.pt").is_file()
    res = runner.invoke(main, args[:-4] + ["--steps", "6", "--resume"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps_run"] == 2 and report["answer_windows"] == 2 and report["eval_on"] == "answers"
    trained = (out / "medusa_heads.safetensors").read_bytes()
    res = runner.invoke(main, args[:-4] + ["--seed", "5"])  # afresh over trained heads: refused before the load
    assert res.exit_code == 1 and "holds trained heads" in res.output and "--overwrite" in res.output
    assert (out / "medusa_heads.safetensors").read_bytes() == trained
    only = tmp_path / "only"
    res = runner.invoke(
        main, [*args[: args.index("--out")], "--out", str(only), *args[args.index("--out") + 2 :], "--cache-only"]
    )
    assert res.exit_code == 0, res.output
    assert "and 2 answers" in res.output and not (only / "medusa_heads.safetensors").exists()
    assert (only / "answers" / "features.safetensors").is_file() and (only / "cache" / "features.safetensors").is_file()

    res = runner.invoke(main, [*args, "--overwrite", "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert (out / "medusa_heads.safetensors").read_bytes() != trained
    res = runner.invoke(main, [*args, "--resume", "--steps", "2"])  # the checkpoint is at step 2 already
    assert res.exit_code == 1 and "nothing to train" in res.output, res.output
    # an --overwrite run that stops before its first checkpoint leaves none of the run it replaces to resume
    res = runner.invoke(main, [*args, "--overwrite", "--seq-len", "1024", "--cache-tokens", "4096"])
    assert res.exit_code == 1 and not (out / "checkpoint").exists(), res.output

    fresh = tmp_path / "fresh"
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    res = runner.invoke(main, ["train-medusa", "--target", str(folder), "--data", str(empty), "--out", str(fresh)])
    assert res.exit_code == 1 and "empty" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        main, ["train-medusa", "--target", str(folder), "--data", str(tmp_path / "nope"), "--out", str(fresh)]
    )
    assert res.exit_code == 1 and "not found" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    res = runner.invoke(main, ["train-medusa", "--target", str(folder), "--data", str(bad), "--out", str(fresh)])
    assert res.exit_code == 1 and "not valid JSON" in res.output
    res = runner.invoke(
        main, ["train-medusa", "--target", str(folder), "--data", str(data), "--out", str(fresh), "--seq-len", "1024"]
    )
    assert res.exit_code == 1 and "seq_len" in res.output
    assert not fresh.exists()  # a run that failed leaves no empty --out behind
    under_a_file = bad / "heads"  # --out below a file: refused before the target loads, not a traceback after it
    res = runner.invoke(
        main, ["train-medusa", "--target", "no-such-model", "--data", str(data), "--out", str(under_a_file)]
    )
    assert res.exit_code == 1 and "bad.jsonl is a file" in res.output and "Traceback" not in res.output

    from specdec.loading import load_model

    model, tokenizer = load_model(str(folder), dtype="float32")
    gen = specdec.SpeculativeGenerator(model, tokenizer, method="medusa", medusa_heads=str(out))
    prompt = tokenizer("def f(x):")["input_ids"]
    assert gen.generate(prompt, max_new_tokens=12).token_ids == hf_greedy(model, prompt, 12)
    seq = tmp_path / "seq"
    res = runner.invoke(
        main, [*args[: args.index("--out")], "--out", str(seq), *args[args.index("--out") + 2 :], "--sequential"]
    )
    assert res.exit_code == 0, res.output
    gen = specdec.SpeculativeGenerator(model, tokenizer, method="medusa", medusa_heads=str(seq))
    assert gen.proposer.heads.config.sequential
    assert gen.generate(prompt, max_new_tokens=12).token_ids == hf_greedy(model, prompt, 12)


def test_feature_cache_grows_without_recomputing(tmp_path):
    from specdec.medusa.train import load_or_collect

    target = tiny_model("llama", vocab=256)
    data = _corpus(tmp_path)
    small = TrainConfig(num_heads=2, seq_len=48, cache_tokens=144, chat_wrap=False)
    h1, p1, _, t1 = load_or_collect(target, ByteTokenizer(), data, small, tmp_path / "o")
    calls = []
    big = TrainConfig(num_heads=2, seq_len=48, cache_tokens=288, chat_wrap=False, cache_save_every=2)
    h2, p2, _, t2 = load_or_collect(target, ByteTokenizer(), data, big, tmp_path / "o", progress=calls.append)
    assert h1.shape[0] == 3 and h2.shape[0] == 6 and len(calls) == 3  # only the 3 new windows were run
    assert [c.done for c in calls] == [1, 2, 3] and all(c.total == 3 for c in calls)
    torch.testing.assert_close(h2[:3], h1)
    assert torch.equal(p2[:3], p1) and torch.equal(t2[:3], t1) and t2.shape == p2.shape
    h3, _, _, t3 = load_or_collect(target, ByteTokenizer(), data, small, tmp_path / "o")
    torch.testing.assert_close(h3, h1)  # a bigger cache serves a smaller request
    assert torch.equal(t3, t1)


def test_exact_label_mask_table():
    # g (preds) and x (tokens): x[t+1] == g[t] at t = 0, 1, 2, 4 (not 3)
    preds = torch.tensor([[5, 6, 7, 9, 2, 3, 4, 1]])
    tokens = torch.tensor([[0, 5, 6, 7, 8, 2, 0, 0]])
    pos, labels = head_labels(preds, 2, 0)  # t = 0 .. 5
    assert pos[:, 1].tolist() == [0, 1, 2, 3, 4, 5]
    mask = exact_label_mask(preds, tokens, pos, 2)
    # head 0 at t needs agree[t]; head 1 needs agree[t] and agree[t+1]
    assert mask.tolist() == [[True, True], [True, True], [True, False], [False, False], [True, False], [False, False]]


def _own_text_corpus(tmp_path: Path, model: torch.nn.Module) -> Path:
    """A corpus the target itself wrote (greedy, ASCII bytes only), so its own predictions often match it."""
    data = tmp_path / "own"
    data.mkdir()
    ids = torch.tensor([[ord(c) for c in "def f(x):\n"]], device=model.device)
    banned = [0, *range(128, 256)]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=400, do_sample=False, suppress_tokens=banned, pad_token_id=1)
    (data / "own.txt").write_text(bytes(out[0].tolist()).decode("ascii"))
    return data


def test_training_with_exact_labels(tmp_path):
    target = tiny_model("llama", vocab=256, sharpness=4.0)
    cfg = _train_config(num_heads=2, steps=5, seq_len=32, batch_size=16, cache_tokens=256, exact_labels=True)
    _, report = train(target, ByteTokenizer(), _own_text_corpus(tmp_path, target), tmp_path / "o", cfg)
    assert report["exact_labels"] and report["train_positions"] <= report["train_positions_all"]
    assert len(report["top1"]) == len(report["top1_all_labels"]) == len(report["exact_label_share"]) == 2


# ---------------------------------------------------------------- answers (in-distribution self-distillation)
def test_answer_batch_is_greedy_decoding_with_its_hidden_states():
    """Left-padded batched answers equal transformers' greedy per prompt, stop at EOS, and keep each
    position's final hidden state (as a full forward over prompt + answer computes it)."""
    from specdec.medusa.distill import ENDED, answer_batch
    from specdec.modelinfo import decoder_body

    prompts = [[5, 9, 13, 2, 7, 7, 30], [11, 3], [40, 41, 42, 43]]
    free = hf_greedy(tiny_model("qwen2", vocab=64, sharpness=3.0), prompts[1], 6)
    target = tiny_model("qwen2", vocab=64, sharpness=3.0, eos=free[3])  # prompt 1 ends at its 4th token
    length = 10
    hidden, preds, tokens = answer_batch(target, prompts, length, {free[3]})
    assert hidden.shape == (3, length, 32) and preds.shape == tokens.shape == (3, length)
    ended = 0
    for r, prompt in enumerate(prompts):
        ref = hf_greedy(target, prompt, length - 1)  # stops after EOS
        row = tokens[r].tolist()
        n = row.index(ENDED) if ENDED in row else length
        assert row[0] == prompt[-1] and row[1:n] == ref[: n - 1]
        assert preds[r, : n - 1].tolist() == row[1:n]  # every label inside the answer is the greedy token
        if n < length:
            ended += 1
            assert row[n - 1] == free[3] and set(row[n:]) == {ENDED}
        with torch.no_grad():
            full = decoder_body(target)(input_ids=torch.tensor([prompt + row[1:n]], device=target.device))
        expected = full.last_hidden_state[0, len(prompt) - 1 :].cpu()
        torch.testing.assert_close(hidden[r, :n], expected, atol=1e-4, rtol=1e-4)
    assert ended >= 1


def _documented_source() -> str:
    body = "\n".join(f"    total += {i}" for i in range(3))
    return (
        "import os\n\n\n"
        "def add_all(values, start=0):\n"
        '    """Add every value to the start and return the total sum."""\n'
        f"    total = start\n{body}\n    return total\n\n\n"
        "class Counter:\n"
        '    """A counter of hashable items with a most-common query."""\n\n'
        "    def __init__(self):\n        self.items = {}\n\n"
        "    def add(self, item):\n        self.items[item] = self.items.get(item, 0) + 1\n\n\n"
        "def undocumented(x):\n    y = x + 1\n    z = y * 2\n    return z\n\n\n"
        "def test_something():\n"
        '    """Tests are not instructions worth answering."""\n    assert 1\n    assert 2\n    assert 3\n'
    )


def test_instructions_from_texts_table():
    from specdec.medusa.distill import python_units

    units = {fields["name"]: (kind, fields) for kind, fields in python_units(_documented_source())}
    assert set(units) == {"add_all", "Counter"}  # undocumented and test functions are skipped
    kind, fields = units["add_all"]
    assert kind == "function" and fields["signature"] == "add_all(values, start)"
    assert fields["summary"] == "Add every value to the start and return the total sum"
    assert fields["code"].startswith("def add_all(values, start=0):") and fields["code"].endswith("return total")
    assert units["Counter"][0] == "class" and units["Counter"][1]["signature"] == "Counter"
    assert list(python_units("def broken(:\n")) == []


def test_instructions_are_seeded_and_spread_over_the_corpus():
    from specdec.medusa.distill import instructions_from_texts

    prose = " ".join(["Speculative decoding proposes tokens and the target checks them in one pass."] * 8)
    texts = [_documented_source(), prose, "a,b,c\n1,2,3\n" * 40, _documented_source().replace("add_all", "mul_all")]
    made = instructions_from_texts(texts, 10, seed=3)
    assert made == instructions_from_texts(texts, 10, seed=3)
    assert instructions_from_texts(texts, 3, seed=3) == made[:3]  # a smaller request is a prefix
    assert len(made) == 5  # two per source file, one summary of the prose, nothing from the CSV
    assert sum(m.startswith("Summarize the following text") for m in made) == 1
    assert all("{" not in m.split("\n")[0] for m in made)  # every template field was filled
    assert any("mul_all" in m for m in made) and any("add_all" in m for m in made)


def test_training_with_answers(tmp_path):
    target = tiny_model("llama", vocab=256, sharpness=4.0)
    cfg = _train_config(
        num_heads=2, steps=6, seq_len=32, batch_size=16, cache_tokens=320, answers=4, answer_batch=3, eval_fraction=0.2
    )
    calls = []
    _, report = train(target, ByteTokenizer(), _corpus(tmp_path), tmp_path / "o", cfg, progress=calls.append)
    assert report["eval_on"] == "answers" and report["answer_windows"] == 4
    assert report["exact_label_share"] == [1.0, 1.0]  # answers are the target's own continuation
    assert len(report["top1_corpus"]) == 2
    # 3 training answers (one of 4 is held out) of 32 positions, less the 2 last, join 5 training windows of
    # the corpus (its 6 files give 6 windows; one is held out)
    assert report["cache_positions"] == 6 * 32
    assert report["train_positions"] == report["train_positions_all"] == 5 * 30 + 3 * 30
    done = [c.done for c in calls if c.phase == "answers"]
    assert done == [3, 4] and all(c.total == 4 for c in calls if c.phase == "answers")
    seen = []
    _, again = train(target, ByteTokenizer(), tmp_path / "corpus", tmp_path / "o", cfg, progress=seen.append)
    assert not [c for c in seen if c.phase in ("answers", "cache")]  # both caches are reused
    assert again["train_positions"] == report["train_positions"]
