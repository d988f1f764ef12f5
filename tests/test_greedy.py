"""Greedy output of every core method equals transformers' greedy decoding, token for token (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

import specdec
from specdec import kvcache
from specdec.tree import depths
from conftest import hf_greedy, tiny_model


def _prompt(seed: int = 1, length: int = 12, vocab: int = 96, repeat: bool = True) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, vocab, (length,), generator=g).tolist()
    return p + p[:6] if repeat else p  # a repeated span gives prompt lookup something to copy


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "method,draft_kind,k",
    [
        ("none", None, None),
        ("prompt_lookup", None, None),
        ("prompt_lookup", None, 2),
        ("draft", "random", None),
        ("draft", "random", 1),
        ("draft", "random", 2),
        ("draft", "random", 5),
        ("draft", "self", None),
        ("draft", "self", 1),
        ("draft", "self", 2),
        ("draft", "self", 5),
        ("auto", "random", None),
        ("auto", None, None),
    ],
)
def test_matches_hf_greedy(arch, method, draft_kind, k):
    target = tiny_model(arch, seed=0)
    draft = {"random": tiny_model(arch, seed=7), "self": target, None: None}[draft_kind]
    prompt = _prompt()
    ref = hf_greedy(target, prompt, 48)
    gen = specdec.SpeculativeGenerator(target, method=method, draft=draft, num_speculative_tokens=k)
    res = gen.generate(prompt, max_new_tokens=48)
    assert res.token_ids == ref
    assert res.stats.new_tokens == 48 and res.finish_reason == "length"
    if draft_kind == "self" and k:
        # the draft model alone (no n-gram candidates): the target as its own draft is always accepted
        gen = specdec.SpeculativeGenerator(
            target,
            method=method,
            draft=draft,
            num_speculative_tokens=k,
            ngram_first=False,
            confidence_stop=0.0,
            int8=False,
            tree_nodes=0,  # a chain (a GPU drafts trees by default)
        )
        res = gen.generate(prompt, max_new_tokens=48)
        assert res.token_ids == ref
        assert res.stats.acceptance_rate == 1.0  # the target as its own draft is always accepted
        assert res.stats.mean_accepted_length > 1.0


@pytest.mark.parametrize("method,draft_kind", [("none", None), ("prompt_lookup", None), ("draft", "random")])
def test_repetition_penalty_matches_hf(method, draft_kind):
    target = tiny_model("llama", seed=0)
    draft = tiny_model("llama", seed=7) if draft_kind else None
    prompt = _prompt(seed=3)
    ref = hf_greedy(target, prompt, 40, repetition_penalty=1.3)
    gen = specdec.SpeculativeGenerator(target, method=method, draft=draft, num_speculative_tokens=3)
    assert gen.generate(prompt, max_new_tokens=40, repetition_penalty=1.3).token_ids == ref


def test_eager_attention_matches_hf():
    target = tiny_model("qwen2", seed=2, attn="eager")
    prompt = _prompt(seed=4)
    gen = specdec.SpeculativeGenerator(
        target, method="draft", draft=tiny_model("qwen2", seed=5, attn="eager"), num_speculative_tokens=3
    )
    assert gen.generate(prompt, max_new_tokens=32).token_ids == hf_greedy(target, prompt, 32)


def test_eos_stops_like_hf():
    probe = tiny_model("llama", seed=0)
    prompt = _prompt()
    eos = hf_greedy(probe, prompt, 20)[9]  # a token greedy decoding reaches
    target = tiny_model("llama", seed=0, eos=eos)
    ref = hf_greedy(target, prompt, 40)
    assert ref[-1] == eos and len(ref) <= 10
    for method, draft in [("none", None), ("draft", target), ("prompt_lookup", None)]:
        res = specdec.SpeculativeGenerator(target, method=method, draft=draft, num_speculative_tokens=4).generate(
            prompt, max_new_tokens=40
        )
        assert res.token_ids == ref and res.finish_reason == "eos"
    # eos_token_id=[] ignores EOS; suppress_tokens bans it (never generated)
    res = specdec.SpeculativeGenerator(target, method="none").generate(prompt, max_new_tokens=30, suppress_tokens=[eos])
    assert eos not in res.token_ids and len(res.token_ids) == 30


def test_context_limit_ends_generation_at_context():
    target = tiny_model("llama", seed=0, max_positions=64)
    prompt = _prompt()
    gen = specdec.SpeculativeGenerator(target, method="draft", draft=target, num_speculative_tokens=8)
    res = gen.generate(prompt, max_new_tokens=64 - len(prompt))
    assert res.token_ids == hf_greedy(target, prompt, 64 - len(prompt))


@pytest.mark.real_model
def test_smollm2_greedy_prompt_lookup_and_self_draft(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "Repeat this list exactly: apples, pears, plums, apples, pears, plums."}]
    gen = specdec.SpeculativeGenerator(model, tok, method="prompt_lookup")
    ids = gen.encode(messages)
    ref = hf_greedy(model, ids, 40)
    res = gen.generate(messages, max_new_tokens=40)
    assert res.token_ids == ref
    assert res.stats.mean_accepted_length > 1.0
    chain = dict(num_speculative_tokens=4, ngram_first=False, tree_nodes=0)
    res = specdec.SpeculativeGenerator(model, tok, method="draft", draft=model, int8=False, **chain).generate(
        messages, max_new_tokens=40
    )
    assert res.token_ids == ref and res.stats.acceptance_rate == 1.0
    # the int8 copy of the draft (the CPU default) proposes slightly different tokens; the output is the same
    res = specdec.SpeculativeGenerator(model, tok, method="draft", draft=model, **chain).generate(
        messages, max_new_tokens=40
    )
    assert res.token_ids == ref and res.stats.acceptance_rate > 0.6
    # a draft tree of 16 nodes (what a GPU drafts by default)
    gen = specdec.SpeculativeGenerator(
        model, tok, method="draft", draft=model, num_speculative_tokens=4, ngram_first=False, tree_nodes=16
    )
    steps = _recorded(gen)
    res = gen.generate(messages, max_new_tokens=40)
    assert res.token_ids == ref and res.stats.mean_accepted_length > 2.0
    assert any(not s.proposal.is_chain for s in steps)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["prompt_lookup", "draft"])
def test_bfloat16_greedy_text_is_the_same_every_run(smollm2, method):
    """In bfloat16 a position's logits depend on the verify forward's row count, so the proposals must not
    follow measured times (which differ from run to run): five runs, in fresh generators and in one that
    carries its state from run to run, give one text."""
    model = copy.deepcopy(smollm2[0]).to(torch.bfloat16)
    tok = smollm2[1]
    extra = {"draft": model} if method == "draft" else {}
    messages = [{"role": "user", "content": "Write a short poem about rivers, then repeat its first line."}]
    carried = specdec.SpeculativeGenerator(model, tok, method=method, **extra)
    texts = {tuple(carried.generate(messages, max_new_tokens=48).token_ids) for _ in range(3)}
    texts |= {
        tuple(
            specdec.SpeculativeGenerator(model, tok, method=method, **extra)
            .generate(messages, max_new_tokens=48)
            .token_ids
        )
        for _ in range(2)
    }
    assert len(texts) == 1 and len(next(iter(texts))) > 8


def test_greedy_proposals_ignore_timings_only_in_reduced_precision():
    from specdec.proposers.base import DecodeState
    from specdec.sampling import SamplingConfig

    def state(greedy: bool, seeded: bool, reduced: bool) -> DecodeState:
        sampling = SamplingConfig() if greedy else SamplingConfig(temperature=0.8)
        return DecodeState(torch.zeros(1, dtype=torch.long), 1, sampling, None, seeded, 0, reduced)

    assert state(greedy=True, seeded=False, reduced=True).timing_free
    assert not state(greedy=True, seeded=False, reduced=False).timing_free
    assert state(greedy=False, seeded=True, reduced=False).timing_free
    assert not state(greedy=False, seeded=False, reduced=True).timing_free


def test_int8_draft_is_a_sharing_copy():
    """The int8 copy shares embeddings and norms, leaves the original alone, and predicts like it."""
    from specdec import compact

    model = tiny_model("llama")
    if model.device.type != "cpu":
        pytest.skip("the int8 draft is a CPU kernel (aten._weight_int8pack_mm)")
    copy = compact.int8_draft(model)
    assert type(model.lm_head) is torch.nn.Linear and isinstance(copy.lm_head, compact.Int8Linear)
    assert copy.model.embed_tokens.weight is model.model.embed_tokens.weight
    ids = torch.randint(model.config.vocab_size, (1, compact.KERNEL_MAX_ROWS + 6))
    with torch.inference_mode():
        ref, got = model(ids).logits, copy(ids).logits  # more rows than the kernel takes: the dense weights
        one_ref, one_got = model(ids[:, :3]).logits, copy(ids[:, :3]).logits  # 3 rows: int8 kernel
    assert torch.equal(ref, got)
    assert torch.allclose(one_ref, one_got, atol=0.05, rtol=0.05)
    assert (one_ref.argmax(-1) == one_got.argmax(-1)).float().mean() > 0.9


def test_ngram_index_offers_alternatives_from_other_occurrences():
    from specdec.ngrams import NgramIndex

    index = NgramIndex(1, 3)
    index.extend([1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2])
    # suffix (1, 2) was followed by 5, 4 and 3 (latest first); (5, 1, 2) has no earlier occurrence
    assert index.lookup(3) == [5, 1, 2]
    assert index.lookup_many(3, 3, branch_tokens=2) == [[5, 1, 2], [4, 1], [3, 1]]
    assert index.lookup_many(3, 2) == [[5, 1, 2], [4, 1, 2]]
    # another text's suffix (committed + drafted tokens), and a longer shortest match
    assert index.lookup_many(2, 2, suffix=[9, 2, 3]) == [[1, 2]]
    assert index.lookup_many(2, 2, suffix=[9, 2]) == [[5, 1], [4, 1]]
    assert index.lookup_many(2, 2, suffix=[9, 2], min_n=2) == []
    small = NgramIndex(1, 2, keep=1)  # only the latest occurrence of each n-gram
    small.extend([1, 2, 3, 1, 2, 4, 1, 2])
    assert small.lookup_many(2, 3) == [[4, 1]]  # (1, 2) and (2,) both remember only the latest: 4


def test_copy_length_follows_how_far_the_match_agrees():
    from specdec.ngrams import LONG_COPY, SHORT_COPY, NgramIndex, copy_length

    assert copy_length(8, 1) == SHORT_COPY  # a lone one-token match: short
    assert copy_length(1, 1) == 1
    assert copy_length(8, 2) == 8  # two agreeing tokens: the adaptive length as it is
    assert copy_length(4, 3) == LONG_COPY  # three or more: at least LONG_COPY
    assert copy_length(20, 5) == 20
    index = NgramIndex(1, 3)
    text = [7, 8, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 0, 8, 1, 2]
    index.extend(text)
    # (8, 1, 2) occurs at 1..3; the tokens before it differ (7 vs 0): 3 agree
    assert index.agreement(4, text) == 3
    assert index.lookup_many(2, 1, limit=32) == [text[4 : 4 + LONG_COPY]]
    assert index.lookup_many(2, 1, limit=5) == [[3, 4, 5, 6, 9]]  # never past the limit
    assert index.lookup_many(2, 1) == [[3, 4]]  # without a limit: k tokens
    index.extend([30, 9])  # the suffix (30, 9) matches only its last token, at 8
    assert index.agreement(9, index.tokens) == 1
    assert index.lookup_many(8, 1, limit=32) == [[10, 11][:SHORT_COPY]]


def test_prompt_lookup_proposes_a_trie_of_alternatives():
    from specdec.proposers.base import DecodeState
    from specdec.proposers.options import PromptLookupOptions
    from specdec.proposers.prompt_lookup import PromptLookupProposer
    from specdec.sampling import SamplingConfig

    tokens = torch.tensor([1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2])
    state = DecodeState(tokens=tokens, prompt_length=11, sampling=SamplingConfig(), generator=None)
    proposer = PromptLookupProposer(PromptLookupOptions(branches=3, branch_tokens=2), fixed=None)
    proposer.reset(state)
    draft = proposer.propose(state, max_nodes=16)
    assert draft.tokens.tolist() == [5, 1, 2, 4, 1, 3, 1]
    assert draft.parents.tolist() == [-1, 0, 1, -1, 3, -1, 5]
    assert proposer._main_branch(draft) == [5, 1, 2]
    fixed = PromptLookupProposer(PromptLookupOptions(), fixed=2)  # a fixed length keeps one chain
    fixed.reset(state)
    chain = fixed.propose(state, max_nodes=16)
    assert chain.tokens.tolist() == [5, 1] and chain.parents is None


def test_draft_copies_only_while_they_pay():
    """An n-gram copy is proposed only when copies yield as much per unit of cost as draft steps;
    an unused copy is still found (and scored later)."""
    from specdec.proposers.base import DecodeState
    from specdec.sampling import SamplingConfig

    model = tiny_model("llama")
    # the proposer driven by hand, without a generation to size a static cache: the dynamic one
    gen = specdec.SpeculativeGenerator(model, method="draft", draft=model, int8=False, static_cache=False)
    proposer = gen.proposer
    tokens = torch.tensor([7, 8, 9, 10, 11, 12, 7, 8, 9])
    state = DecodeState(tokens=tokens, prompt_length=9, sampling=SamplingConfig(), generator=None)
    proposer.reset(state)
    proposer.copy_value, proposer.draft_value = 3.0, 2.0
    with torch.inference_mode():
        draft = proposer.propose(state, max_nodes=8)
        assert draft.tokens.tolist()[:3] == [10, 11, 12] and not proposer._ran
        proposer.copy_value = 1.0
        draft = proposer.propose(state, max_nodes=8)
    assert proposer._ran and proposer._copy[:3] == [10, 11, 12]


@pytest.mark.parametrize("method", ["lookahead", "prompt_lookup"])
def test_the_prompt_is_prefilled_apart(method):
    """The prompt before the pending token is cached by one causal forward without a mask or hidden
    states; every step's forward then holds only the step's own rows (root, nodes, extra rows)."""
    model = tiny_model("llama")
    gen = specdec.SpeculativeGenerator(model, method=method, static_cache=False)  # the static path pads rows
    calls, observed = [], []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (kwargs["input_ids"].shape[1], kwargs.get("attention_mask"), kwargs.get("output_hidden_states"))
        ),
        with_kwargs=True,
    )
    observe = gen.proposer.observe
    gen.proposer.observe = lambda outcome: (observed.append(outcome.logits.shape[0]), observe(outcome))
    prompt = [3, 4, 5, 6, 3, 4] * 20
    try:
        result = gen.generate(prompt, max_new_tokens=6)
    finally:
        hook.remove()
    rows, mask, hidden = calls[0]
    assert rows == len(prompt) - 1 and mask is None and not hidden
    assert len(calls) == 1 + result.stats.steps
    assert [
        rows for rows, _, _ in calls[1 : 1 + len(observed)]
    ] == observed  # a step's forward: exactly its verified and extra rows


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_draft_checks_context_copies_in_its_own_forward(arch):
    """Under greedy decoding the draft verifies a context copy of what it is drafting: the drafted
    tokens are exactly its own sequential greedy choices, in fewer draft forwards when the text repeats."""
    from specdec.proposers.base import DecodeState
    from specdec.sampling import SamplingConfig

    model = tiny_model(arch, seed=3, sharpness=6.0)
    prompt = [5, 17, 33, 8, 61, 2, 44]
    context = prompt + hf_greedy(model, prompt, 30)  # a peaked random model falls into a loop
    gen = specdec.SpeculativeGenerator(
        model, method="draft", draft=model, int8=False, confidence_stop=0.0, static_cache=False
    )  # driven by hand, and its cache read as a DynamicCache
    proposer = gen.proposer
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        state = DecodeState(torch.tensor(context), len(prompt), SamplingConfig(), None)
        proposer.reset(state)
        with torch.inference_mode():
            drafted = proposer._draft_chain(state, 12).tokens.tolist()
    finally:
        hook.remove()
    assert drafted == hf_greedy(model, context, 12)
    assert len(forwards) < 12  # copied tokens the draft agreed with came several per forward
    assert (
        proposer.kv.length == kvcache.cache_length(proposer.kv.cache) == len(context) + 12 - 1
    )  # committed + fed drafted tokens


@pytest.mark.parametrize("ngram_first", [True, False])
def test_a_draft_length_of_zero_proposes_nothing(ngram_first):
    """``num_speculative_tokens=0`` is plain decoding through the draft method: no copied n-grams, no
    probing drafts, the target's greedy tokens."""
    target = tiny_model("llama", seed=0, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(
        target, method="draft", draft=target, num_speculative_tokens=0, ngram_first=ngram_first, int8=False
    )
    prompt = [5, 17, 33, 8, 61, 2, 44, 17, 33, 8, 61, 9, 5, 17]  # repeats: copies would be found
    res = gen.generate(prompt, max_new_tokens=40)
    assert res.token_ids == hf_greedy(target, prompt, 40)
    assert res.stats.proposed == 0 and res.stats.steps == 40


def _recorded(gen: specdec.SpeculativeGenerator) -> list:
    """Wrap ``gen``'s proposer so that every verified step's outcome is kept (a list that fills as it runs)."""
    outcomes = []
    observe = gen.proposer.observe

    def record(outcome):
        outcomes.append(outcome)
        observe(outcome)

    gen.proposer.observe = record
    return outcomes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "draft_kind,k,nodes,static",
    [("random", None, 12, False), ("random", 4, 31, True), ("self", 3, 8, False), ("self", None, 12, True)],
)
def test_draft_trees_match_hf_greedy(arch, draft_kind, k, nodes, static):
    """A draft tree (the draft's likeliest tokens at its likeliest nodes) gives plain greedy output, on
    either cache path; with the target as its own draft its first token is always accepted."""
    target = tiny_model(arch, seed=0, sharpness=3.0)
    draft = target if draft_kind == "self" else tiny_model(arch, seed=7, sharpness=3.0)
    prompt = _prompt()
    ref = hf_greedy(target, prompt, 48)
    gen = specdec.SpeculativeGenerator(
        target,
        method="draft",
        draft=draft,
        num_speculative_tokens=k,
        tree_nodes=nodes,
        static_cache=static,
        int8=False,
        ngram_first=False,
        confidence_stop=0.0 if k else 0.3,  # 0: every tree grows k deep (its likeliest nodes may be shallower)
    )
    steps = _recorded(gen)
    res = gen.generate(prompt, max_new_tokens=48)
    assert res.token_ids == ref
    trees = [s for s in steps if s.proposal.num_nodes]
    assert trees and all(not s.proposal.is_chain and s.proposal.num_nodes <= nodes for s in trees)
    deepest = [int(depths(s.proposal.parents).max()) for s in trees]
    assert any(s.proposal.num_nodes > d for s, d in zip(trees, deepest))  # wider than a chain as deep
    if k:
        assert max(deepest) > 1
    if draft_kind == "self":
        assert all(s.accepted_nodes for s in trees)


def test_draft_trees_only_under_plain_greedy_decoding():
    """Sampling and a repetition penalty (whose draft distribution depends on each node's own path) draft chains."""
    target = tiny_model("llama", seed=0, sharpness=3.0)
    draft = tiny_model("llama", seed=7, sharpness=3.0)
    prompt = _prompt()
    for kwargs in ({"temperature": 0.8, "seed": 3}, {"repetition_penalty": 1.3}):
        gen = specdec.SpeculativeGenerator(
            target, method="draft", draft=draft, num_speculative_tokens=3, tree_nodes=12, int8=False
        )
        steps = _recorded(gen)
        res = gen.generate(prompt, max_new_tokens=24, **kwargs)
        assert all(s.proposal.is_chain for s in steps) and res.stats.proposed > 0
        if "repetition_penalty" in kwargs:
            assert res.token_ids == hf_greedy(target, prompt, 24, repetition_penalty=1.3)


def test_draft_trees_are_drafted_where_target_rows_are_nearly_free():
    from specdec.proposers.draft_model import tree_nodes
    from specdec.proposers.options import DRAFT_TREE_ROWS, DraftOptions

    assert tree_nodes(DraftOptions(), "cuda") == DRAFT_TREE_ROWS - 1
    for kind in ("cpu", "cpu-fp32", "cpu-emulated"):
        assert tree_nodes(DraftOptions(), kind) == 0
    assert tree_nodes(DraftOptions(tree_nodes=5), "cpu") == 5
    assert tree_nodes(DraftOptions(tree_nodes=0), "cuda") == 0
    # a generator choosing as on a GPU (as scripts/project_gpu.py traces do) drafts trees by default
    target = tiny_model("qwen2", seed=0, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="draft", draft=tiny_model("qwen2", seed=7, sharpness=3.0))
    gen.cost_kind = "cuda"
    steps = _recorded(gen)
    res = gen.generate(_prompt(), max_new_tokens=32)
    assert res.token_ids == hf_greedy(target, _prompt(), 32)
    assert any(not s.proposal.is_chain for s in steps)


def test_a_draft_tree_holds_its_likeliest_nodes_parents_first():
    from specdec.proposers.draft_model import DraftTree

    g = torch.Generator().manual_seed(0)
    tree = DraftTree()
    tree.offer([-1], torch.log_softmax(torch.randn(1, 50, generator=g), -1), 4)
    for depth in range(1, 5):
        grow = tree.frontier(depth, 3)
        rows = tree.with_ancestors(grow)
        assert rows[-len(grow) :] == grow  # the frontier last, in its order (the forward's last rows)
        seen = tree.visibility(rows)
        for j, node in enumerate(rows):  # a row sees itself and its ancestors only
            path = set()
            while node >= 0:
                path.add(rows.index(node))
                node = tree.parents[node]
            assert set(seen[j].nonzero().flatten().tolist()) == path
        tree.offer(grow, torch.log_softmax(torch.randn(len(grow), 50, generator=g), -1), 4)
    tokens, parents = tree.best(20)
    assert len(tokens) == 20
    scores = sorted(tree.scores, reverse=True)
    chosen: list[tuple[int, ...]] = []
    for token, parent in zip(tokens, parents):
        assert parent < len(chosen)  # a parent before its children
        chosen.append((chosen[parent] if parent >= 0 else ()) + (token,))
    assert len(set(chosen)) == 20  # siblings differ
    # the 20 likeliest paths: every chosen score is at least the 20th best
    kept = {tuple(_path(tree, i)) for i in range(len(tree.tokens)) if tree.scores[i] >= scores[19]}
    assert set(chosen) <= kept


def _path(tree, node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return out[::-1]


@pytest.mark.parametrize("static", [False, True])
def test_a_draft_step_over_repeating_text_drafts_a_chain(static):
    """Where the context offers a copy (but a copy alone is not worth a step), a tree-drafting proposer drafts
    a chain, which checks the copy in its own forwards; elsewhere a tree."""
    from specdec.proposers.base import DecodeState
    from specdec.sampling import SamplingConfig

    target = tiny_model("qwen2", seed=3, sharpness=6.0)
    draft = tiny_model("qwen2", seed=8, sharpness=6.0)
    for prompt, chain in (([5, 17, 33, 8, 61, 2, 44, 17, 33, 8], True), ([5, 17, 33, 8, 61, 2, 44], False)):
        gen = specdec.SpeculativeGenerator(target, method="draft", draft=draft, tree_nodes=8, static_cache=static)
        proposer = gen.proposer
        state = DecodeState(torch.tensor(prompt), len(prompt), SamplingConfig(), None, capacity=64, cost_kind="cuda")
        with torch.inference_mode():
            proposer.reset(state)
            proposer.copy_value, proposer.draft_value = 0.0, 1.0  # copies alone have not paid: a draft step
            proposal = proposer.propose(state, max_nodes=16)
        assert proposer._ran and proposal.num_nodes
        assert proposal.is_chain == chain and bool(proposer._copy) == chain
        assert gen.generate(prompt, max_new_tokens=40).token_ids == hf_greedy(target, prompt, 40)


def test_a_draft_tree_is_never_deeper_than_a_step_can_hold():
    """A fixed draft length far beyond the widest bucket: a tree grows at most TREE_MAX_DEPTH deep (its
    widest draft forward, a depth's nodes and their ancestors, then fits the static cache's headroom),
    and the output is plain greedy decoding."""
    from specdec.proposers.draft_model import TREE_BEAM, TREE_MAX_DEPTH
    from specdec.static import BUCKETS

    target = tiny_model("llama", seed=3, sharpness=6.0)
    prompt = [5, 17, 33, 8, 61, 2, 44]
    gen = specdec.SpeculativeGenerator(
        target,
        method="draft",
        draft=copy.deepcopy(target),
        num_speculative_tokens=200,
        tree_nodes=8,
        confidence_stop=0.0,
        ngram_first=False,
        int8=False,
        static_cache=True,
    )
    forwards = []
    observe = gen.proposer.observe

    def record(outcome):
        forwards.append(gen.proposer._forwards)
        observe(outcome)

    gen.proposer.observe = record
    res = gen.generate(prompt, max_new_tokens=100)
    assert res.token_ids == hf_greedy(target, prompt, 100)
    assert max(forwards) == TREE_MAX_DEPTH and TREE_BEAM * TREE_MAX_DEPTH <= max(BUCKETS)
