"""The static path (preallocated caches, row buckets; graphs on CUDA) is lossless like the dynamic one.

On a CPU ``static_cache=True`` runs every part of the path but the graph
capture; ``python -m pytest --device cuda`` runs these with graphs on.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import pytest
import torch

import specdec
from conftest import DEVICE, hf_greedy, tiny_model
from specdec import kvcache, static
from specdec.medusa.heads import MedusaHeads
from torch.utils._python_dispatch import TorchDispatchMode

from test_sampling import N_RUNS, VOCAB, _exact_two_tokens, histogram, noise_bound, tv

PROMPT = [5, 17, 33, 8, 61, 2, 44, 17, 33, 8, 61, 9, 5, 17]  # repeats, so copies are proposed

METHODS = [
    ("none", {}),
    ("prompt_lookup", {}),
    ("lookahead", {}),
    ("lookahead", {"window_size": 8, "ngram_size": 5, "guess_size": 8}),  # wide steps: buckets 32-128
    ("draft", {"draft": "random"}),
    ("draft", {"draft": "self", "num_speculative_tokens": 5, "ngram_first": False}),
    ("medusa", {"medusa_heads": "fresh"}),
]


def _generator(target, method: str, options: dict, static_cache: bool) -> specdec.SpeculativeGenerator:
    options = dict(options)
    kind = options.pop("draft", None)
    draft = {"random": lambda: tiny_model(target.config.model_type, seed=7), "self": lambda: target}.get(kind)
    if options.get("medusa_heads") == "fresh":
        options["medusa_heads"] = MedusaHeads.init(target, num_heads=3)
    return specdec.SpeculativeGenerator(
        target, method=method, draft=draft() if draft else None, static_cache=static_cache, **options
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method,options", METHODS)
def test_static_greedy_equals_dynamic_and_hf(arch, method, options):
    target = tiny_model(arch, seed=0, sharpness=3.0)
    ref = hf_greedy(target, PROMPT, 40)
    on = _generator(target, method, options, static_cache=True)
    assert isinstance(on.kv, static.StaticKV) and on.static_cache
    res = on.generate(PROMPT, max_new_tokens=40)
    assert res.token_ids == ref
    assert res.stats.static_cache and res.stats.to_dict()["static_cache"]
    off = _generator(target, method, options, static_cache=False)
    assert isinstance(off.kv, kvcache.DynamicKV)
    assert off.generate(PROMPT, max_new_tokens=40).token_ids == ref
    if method == "draft":
        assert isinstance(on.proposer.kv, static.StaticKV) and isinstance(off.proposer.kv, kvcache.DynamicKV)
    # a second, longer generation reuses or regrows the cache and still matches
    longer = PROMPT * 3
    assert on.generate(longer, max_new_tokens=20).token_ids == hf_greedy(target, longer, 20)


def test_static_greedy_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Rewrite this list in reverse order: apples, pears, plums, figs."}]
    for method in ("prompt_lookup", "lookahead", "draft"):
        draft = model if method == "draft" else None
        on = specdec.SpeculativeGenerator(model, tokenizer, method=method, draft=draft, static_cache=True)
        off = specdec.SpeculativeGenerator(model, tokenizer, method=method, draft=draft, static_cache=False)
        prompt = on.encode(messages)
        ref = hf_greedy(model, prompt, 32)
        assert on.generate(prompt, max_new_tokens=32).token_ids == ref, method
        assert off.generate(prompt, max_new_tokens=32).token_ids == ref, method


@pytest.mark.parametrize("method,compile_steps", [("draft", False), ("lookahead", False), ("draft", True)])
def test_static_sampling_distribution_matches_target(method, compile_steps):
    """Sampling on the static path draws from the target's distribution, its steps compiled or not."""
    from specdec.sampling import SamplingConfig

    cfg = SamplingConfig(temperature=1.0)
    target = tiny_model("llama", seed=0, vocab=VOCAB, sharpness=6.0)
    draft = tiny_model("llama", seed=3, vocab=VOCAB, sharpness=6.0) if method == "draft" else None
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    gen = specdec.SpeculativeGenerator(
        target,
        method=method,
        draft=draft,
        static_cache=True,
        compile_steps=compile_steps,
        num_speculative_tokens=2 if draft else None,
    )
    exact = _exact_two_tokens(target, prompt, cfg)
    samples = []
    for seed in range(N_RUNS // 2):
        ids = gen.generate(prompt, max_new_tokens=2, temperature=1.0, seed=seed).token_ids
        samples.append(ids[0] * VOCAB + ids[1])
    assert tv(histogram(samples, VOCAB * VOCAB), exact) < noise_bound(exact, N_RUNS // 2)
    assert gen.compile_steps == compile_steps  # a compiled run stayed compiled


def sampling_setup(method: str) -> tuple[torch.nn.Module, dict]:
    """A small-vocabulary target and the options of ``method`` for :func:`_generator`, for seeded sampling."""
    target = tiny_model("qwen2", seed=0, vocab=32, sharpness=3.0)
    options = {"draft": "random"} if method == "draft" else {"medusa_heads": "fresh"} if method == "medusa" else {}
    return target, options


@pytest.mark.parametrize("method", ["draft", "prompt_lookup", "medusa"])
def test_seeded_sampling_is_the_same_static_or_not(method):
    """The static path changes where KV lives, not what is drawn: same seed, same tokens."""
    target, options = sampling_setup(method)
    kwargs = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    prompt = [1, 5, 9, 2, 1, 5]
    runs = [_generator(target, method, options, s).generate(prompt, **kwargs).token_ids for s in (True, False, True)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize(
    "arch,method,options",
    [("llama", "draft", {"draft": "random"}), ("qwen2", "medusa", {"medusa_heads": "fresh"})],
)
def test_compiled_steps_greedy_equals_hf(arch, method, options, caplog):
    """Steps compiled by torch.compile (fused kernels; on CUDA then captured) give plain greedy decoding's tokens.

    A draft compiles the target's and the draft's steps (one row and more); Medusa's steps return hidden states.
    """
    target = tiny_model(arch, seed=0, sharpness=3.0)
    ref = hf_greedy(target, PROMPT, 40)
    options = dict(options)
    # a draft of other sizes than the target's, as a real pair: both compile through the one step function
    draft = tiny_model(arch, seed=7, hidden=64, layers=3) if options.pop("draft", None) else None
    if options.get("medusa_heads") == "fresh":
        options["medusa_heads"] = MedusaHeads.init(target, num_heads=3)
    gen = specdec.SpeculativeGenerator(target, method=method, draft=draft, compile_steps=True, **options)
    assert gen.static_cache and gen.compile_steps  # compile_steps turns the static cache on
    torch._dynamo.reset()  # steps compiled by another test for models of these shapes would serve these
    graphs = static.compiled_graphs()
    drafts, handed = [], []  # what the draft's steps told its controller, what its proposals handed on
    if draft is not None:
        record, propose = gen.proposer.controller.record_draft, gen.proposer.propose
        gen.proposer.controller.record_draft = lambda s: (drafts.append(s), record(s))[1]
        gen.proposer.propose = lambda *a: (p := propose(*a), handed.append(p.capture_seconds))[0]
    with caplog.at_level(logging.WARNING, logger="specdec"):
        res = gen.generate(PROMPT, max_new_tokens=40)
        assert res.token_ids == ref
        compiled = static.compiled_graphs()
        caches = [gen.kv, *([gen.proposer.kv] if draft is not None else [])]
        with torch.inference_mode():  # every width of a step was compiled at the first forward: none compiles later
            for kv, rows in itertools.product(caches, (1, 3, 9)):  # Medusa's steps return hidden states
                length = kv.length
                kv.forward(torch.ones(rows, dtype=torch.long, device=kv.device), keep=1, hidden=method == "medusa")
                kv.truncate(length)
        assert static.compiled_graphs() == compiled
        longer = PROMPT * 3  # another prompt, a wider cache: the compiled steps serve it
        assert gen.generate(longer, max_new_tokens=20).token_ids == hf_greedy(target, longer, 20)
    assert not [r.getMessage() for r in caplog.records if r.name == "specdec"]
    assert gen.compile_steps and (method != "draft" or gen.proposer.kv.compiled)
    assert static.compiled_graphs() > graphs  # the steps really ran compiled
    assert res.stats.compile_steps and res.stats.graph_capture_seconds > 0  # the compile is one-time work
    if draft is not None:  # the draft's compiles are reported with the target's, and are not draft step costs
        assert sum(handed) > 0 and drafts and max(drafts) < 0.1 * res.stats.graph_capture_seconds


@pytest.mark.skipif(DEVICE.type != "cpu", reason="breaks the CPU's C++ compiler; a GPU compiles with triton")
def test_a_failed_compile_runs_the_steps_uncompiled_with_one_log_line(monkeypatch, caplog):
    """No working compiler (a laptop without one): one log line, then the same tokens, uncompiled."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "force_disable_caches", True)
    torch._dynamo.reset()  # no step compiled by an earlier test may be reused
    target = tiny_model("llama", seed=0, sharpness=3.0)
    gen = specdec.SpeculativeGenerator(target, method="prompt_lookup", compile_steps=True)
    with caplog.at_level(logging.WARNING, logger="specdec"):
        res = gen.generate(PROMPT, max_new_tokens=30)
    assert res.token_ids == hf_greedy(target, PROMPT, 30)
    messages = [r.getMessage() for r in caplog.records if r.name == "specdec"]
    assert len(messages) == 1 and "torch.compile of the static steps failed" in messages[0], messages
    assert not gen.compile_steps and not res.stats.compile_steps and gen.static_cache


def test_compiled_steps_need_the_static_cache():
    with pytest.raises(specdec.SpecdecError, match="compile_steps") as info:
        specdec.SpeculativeGenerator(tiny_model("llama"), method="none", static_cache=False, compile_steps=True)
    assert "--compile-steps" in info.value.hint
    with pytest.raises(specdec.SpecdecError, match="compile_steps"):  # refused before any model is looked for
        specdec.load("no/such-model", static_cache=False, compile_steps=True)


def test_tree_compaction_moves_the_accepted_rows_in_place():
    """keep_rows copies the accepted rows of a step to the front of the step's slots, like the dynamic cache."""
    target = tiny_model("llama", seed=0)
    tokens = torch.tensor(PROMPT, device=DEVICE)
    kvs = [static.StaticKV(target), kvcache.DynamicKV(target)]
    allowed = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([0, 1, 1, 2]) + len(PROMPT)
    step = torch.tensor([3, 9, 4, 6], device=DEVICE)
    with torch.inference_mode():
        for kv in kvs:
            kv.start(64)
            kv.forward(tokens)
            kv.forward(step, positions, allowed, keep=4)
            kv.keep_rows(len(PROMPT), [0, 2, 3])  # root, then the second branch
        assert kvs[0].length == kvs[1].length == len(PROMPT) + 3
        for a, b in zip(kvs[0].cache.layers, kvs[1].cache.layers):
            n = kvs[1].length
            torch.testing.assert_close(a.keys[:, :, :n], b.keys)
            torch.testing.assert_close(a.values[:, :, :n], b.values)
        # the next forward sees exactly the kept rows
        outs = [kv.forward(torch.tensor([7], device=DEVICE)).logits for kv in kvs]
        torch.testing.assert_close(outs[0], outs[1])


def test_steps_run_at_row_buckets_and_the_cache_is_reused():
    target = tiny_model("llama", seed=0)
    kv = static.StaticKV(target)
    assert [static.bucket(r) for r in (1, 3, 8, 9, 128, 200)] == [1, 4, 8, 16, 128, 256] and static.bucket(257) is None
    rows = []
    hook = target.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        with torch.inference_mode():
            kv.start(300)
            assert kv.capacity == 2 * static.CAPACITY_STEP
            cache = kv.cache
            kv.forward(torch.tensor(PROMPT * 20, device=DEVICE))  # beyond the buckets: eager, its own length
            kv.forward(torch.tensor([1, 2, 3], device=DEVICE))  # a step of 3 rows: bucket 4
            kv.start(200)
            assert kv.cache is cache and kv.length == 0  # a smaller generation: the same cache (and graphs)
            kv.start(2 * static.CAPACITY_STEP + 1)
            assert kv.capacity == 3 * static.CAPACITY_STEP and kv.cache is not cache
    finally:
        hook.remove()
    assert rows == [len(PROMPT) * 20, 4]


def test_models_the_static_path_cannot_take_fall_back_with_one_log_line(caplog):
    target = tiny_model("llama", seed=0)
    target.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING, logger="specdec"):
        gen = specdec.SpeculativeGenerator(target, method="prompt_lookup", static_cache=True)
    assert isinstance(gen.kv, kvcache.DynamicKV) and not gen.static_cache
    assert len(caplog.records) == 1 and "flash_attention_2" in caplog.records[0].getMessage()


def test_static_cache_defaults_to_the_device():
    gen = specdec.SpeculativeGenerator(tiny_model("llama"), method="none")
    assert gen.static_cache == (DEVICE.type == "cuda")


def test_a_static_cache_that_does_not_fit_is_a_clear_error():
    kv = static.StaticKV(tiny_model("llama"))
    with pytest.raises(specdec.StaticCacheMemoryError, match=r"MiB for .* positions") as info:
        kv.start(2**40)
    assert "--no-static-cache" in info.value.hint
    assert info.value.capacity >= 2**40 and info.value.mib > 2**20


HOST_SYNCS = {
    *("item", "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select"),
    *("unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "lift_fresh", "lift_fresh_copy"),
}
"""aten ops that read a device tensor on the host or build one from host data: a CUDA graph capture
fails on them (or bakes a value into the graph), so a captured step must make none."""


class _OpRecorder(TorchDispatchMode):
    """Counts the aten ops run under it and the devices of the tensors they take."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.devices: set[torch.device] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name().split("::")[-1].split(".")[0]] += 1
        flat = [*args, *(kwargs or {}).values()]
        flat += [x for a in flat if isinstance(a, (list, tuple)) for x in a]
        self.devices |= {a.device for a in flat if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("rows,hidden", [(1, False), (8, True)])
def test_the_captured_step_forward_makes_no_host_sync(arch, rows, hidden):
    """What ``StaticKV`` captures as a CUDA graph (the model's forward over a bucket's buffers and the
    static cache) is checked op by op on any device: no host reads of device values, no tensors made
    from host data, no tensor on another device. A CPU shows what a GPU capture would refuse."""
    kv = static.StaticKV(tiny_model(arch, seed=0), graphs=False)
    allowed = torch.ones(rows, rows, dtype=torch.bool).tril()
    allowed[rows // 2 :, 1 : rows // 2] = False  # two branches: a tree, not a chain
    with torch.inference_mode():
        kv.start(64)
        kv.forward(torch.tensor(PROMPT, device=DEVICE))
        kv._fill(rows, torch.arange(rows, device=DEVICE) + 3, None, allowed)
        recorder = _OpRecorder()
        with recorder:
            logits, last = kv._call(rows, hidden)
    assert logits.shape[:2] == (1, rows) and (last is not None) == hidden
    syncs = {op: n for op, n in recorder.ops.items() if op in HOST_SYNCS}
    assert not syncs, f"the step forward syncs with the host: {syncs}"
    assert recorder.devices == {kv.device}, f"the step forward takes tensors from {recorder.devices}"
    assert recorder.ops["index_copy_"] == 2 * kv.model.config.num_hidden_layers  # it writes the cache


def _ops_of(action) -> Counter[str]:
    recorder = _OpRecorder()
    with torch.inference_mode(), recorder:
        action()
    return recorder.ops


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_steps_host_work_does_not_grow_with_the_cache(arch):
    """On a GPU every op outside the captured forward is a launch paid on the host at each step, so a
    rewind, a rejection and a tree compaction are one operation for all layers, and a run of one-row
    steps writes its token and nothing else (no mask over the cache's width)."""
    per_depth = []
    for layers in (2, 5):
        kv = static.StaticKV(tiny_model(arch, seed=0, layers=layers), graphs=False)
        with torch.inference_mode():
            kv.start(64)
            kv.forward(torch.tensor(PROMPT, device=DEVICE))
            kv.forward(torch.tensor([3], device=DEVICE))
        base = kv.length
        tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # a root and two children
        token = torch.tensor([4], device=DEVICE)
        ops = {
            "one-row inputs": _ops_of(lambda: kv._fill(1, token, None, None)),
            "padded step": _ops_of(lambda: kv._rewind(1)),
            "rejection": _ops_of(lambda: kv.truncate(base - 1)),
        }
        with torch.inference_mode():
            kv.forward(torch.tensor([5, 6, 7], device=DEVICE), torch.tensor([base, base + 1, base + 1]), tree, keep=3)
        ops["compaction"] = _ops_of(lambda: kv.keep_rows(base, [0, 2]))
        assert kv.length == base + 2
        per_depth.append(ops)
        writes = {op: n for op, n in ops["one-row inputs"].items() if op.endswith("_") or op in ("zeros", "arange")}
        assert writes == {"copy_": 1}, writes
    assert per_depth[0] == per_depth[1]
