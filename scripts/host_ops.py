"""Host work per decode step outside the static path's captured forward: ops counted and time taken.

    python scripts/host_ops.py [--layers 28] [--methods none,prompt_lookup,lookahead,draft,...] [--tokens 120]
                               [--repeats 5] [--device cpu|cuda]

On a GPU the captured forward is one graph replay, and every other op of a step (building inputs,
rewinding the cache, compacting a tree, verifying) is launched from the host one by one, so its
count and host time add to each step whatever the model's size. This builds a Qwen2-shaped model
with ``--layers`` layers of tiny width (random weights, a sharpened head so that greedy output
repeats and the speculative methods find copies), runs each method with ``static_cache=True`` and
reports per target step:

- ``ops``: aten ops outside the forward (views and metadata ops left out; on a CPU some are host
  work that a GPU does not launch), counted with a dispatch recorder, and the most frequent ones;
- ``host_ms``: wall time outside the forward, the fastest of ``--repeats`` generations.

Prints one JSON line per method. On a CPU the static path runs without capture and the time spent
in the forwards is taken out; the counts are what a GPU launches beside its graphs (a CPU op costs less
host time than a CUDA launch, so ``host_ms`` there is a lower bound of a GPU's). With ``--device cuda``
the forwards are graph replays of a model of tiny width (a few microseconds a layer), so ``host_ms``, the
wall time per step, is nearly all the host's work: what a step costs beside the target's own forward.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

import specdec
from specdec import static

VIEWS = {
    *("slice", "select", "unsqueeze", "squeeze", "detach", "detach_", "alias", "view", "_unsafe_view"),
    *("expand", "t", "transpose", "permute", "as_strided", "reshape", "split", "unbind"),
    *("resolve_conj", "resolve_neg", "diagonal"),
}
PROMPT = [5, 17, 33, 8, 61, 2, 44, 17, 33, 8, 61, 9, 5, 17] * 3
VARIANTS = {
    # the draft method's chain and tree (as a GPU drafts under greedy decoding), without context copies
    "draft-chain": {"tree_nodes": 0, "ngram_first": False},
    "draft-tree": {"tree_nodes": 31, "ngram_first": False},
    # lookahead with the widest window of the GPU profiles (gpu-24gb): a step of up to 121 rows
    "lookahead-wide": {"window_size": 15, "ngram_size": 5, "guess_size": 15},
}


class StepOps(TorchDispatchMode):
    """Counts the non-view aten ops run outside the forwards that :meth:`wrap` marks."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.ops: Counter[str] = Counter()

    def wrap(self, call):
        def marked(*args):
            self.inside += 1
            try:
                return call(*args)
            finally:
                self.inside -= 1

        return marked

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[-1].split(".")[0]
        if not self.inside and name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def tiny_deep_model(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def measure(model, method: str, tokens: int, repeats: int) -> dict:
    """Ops and host milliseconds per target step outside the forwards (the target's and, for ``draft``,
    the draft's: here the model itself) for ``method``."""
    draft = {"draft": model} if method.startswith("draft") else {}
    gen = specdec.SpeculativeGenerator(
        model, method=method.split("-")[0], static_cache=True, **draft, **VARIANTS.get(method, {})
    )
    caches = [gen.kv, *([gen.proposer.kv] if draft else [])]
    if not all(isinstance(kv, static.StaticKV) for kv in caches):
        raise SystemExit(f"{method}: the static path is off (see the log line above)")
    calls = [kv._call for kv in caches]
    spent = {"s": 0.0}

    def timed(call):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return call(*args)
            finally:
                spent["s"] += time.perf_counter() - t0

        return run

    for _ in range(2):  # allocates; on CUDA captures every bucket these runs use
        gen.generate(PROMPT, max_new_tokens=tokens)
    for kv, call in zip(caches, calls):
        kv._call = timed(call)
    sync = torch.cuda.synchronize if gen.device.type == "cuda" else (lambda: None)
    host = []
    for _ in range(repeats):
        spent["s"] = 0.0
        sync()
        t0 = time.perf_counter()
        gen.generate(PROMPT, max_new_tokens=tokens)
        sync()
        host.append((time.perf_counter() - t0 - spent["s"]) / gen.last_stats.steps)
    recorder = StepOps()
    for kv, call in zip(caches, calls):
        kv._call = recorder.wrap(call)
    with recorder:
        gen.generate(PROMPT, max_new_tokens=tokens)
    steps = gen.last_stats.steps
    return {
        "method": method,
        "device": str(gen.device),
        "graphs": all(kv.graphs for kv in caches),
        "steps": steps,
        "tokens_per_step": round(gen.last_stats.new_tokens / steps, 2),
        "ops": round(sum(recorder.ops.values()) / steps, 1),
        "host_ms": round(min(host) * 1e3, 3),
        "most": {k: round(v / steps, 1) for k, v in recorder.ops.most_common(8)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28, help="decoder layers (Qwen2.5-1.5B has 28)")
    ap.add_argument(
        "--methods",
        default="none,prompt_lookup,lookahead,lookahead-wide,draft,draft-chain,draft-tree",
        help="draft drafts with the model itself; draft-chain and draft-tree: chains or trees, no context copies; "
        "lookahead-wide: W=15 N=5 G=15",
    )
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: there the forwards are graph replays")
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_deep_model(args.layers).to(args.device)
    with torch.inference_mode():
        for method in args.methods.split(","):
            print(json.dumps(measure(model, method, args.tokens, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
