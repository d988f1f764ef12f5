"""Decode-step costs and tokens/s on a GPU, eager against the static path (CUDA graphs), random weights.

    python scripts/gpu_profile.py --device cuda --dtype bfloat16 --out runs/gpu-profile.json [--targets 1.5b,7b]
    python scripts/gpu_profile.py --device cuda --kinds compiled --targets 1.5b --out runs/gpu-profile-compiled.json

Builds Qwen2.5-shaped models of the real sizes with random weights on the
device (real checkpoints do not travel to a lent GPU; timings do not depend on
the weights, acceptance does, so accepted lengths here mean nothing) and
measures, in one process, for each target with the 0.5B draft:

- ``step_ms``: one forward over ``R`` new rows (the row buckets of
  :mod:`specdec.static`) on a cached prompt, through the engine's own caches:
  ``eager`` (:class:`~specdec.kvcache.DynamicKV`, the tree mask for ``R > 1``)
  and ``static`` (:class:`~specdec.static.StaticKV`: preallocated cache, graphs
  on CUDA) and, with ``--kinds compiled``, ``compiled`` (the static path with
  its steps compiled by ``torch.compile``, then captured); the draft's steps
  likewise (a draft tree's forwards run over many rows); medians between
  synchronisations;
- ``capture_s``: seconds to capture each bucket's graph; ``compiled_capture_s``:
  for ``compiled``, the compile of every width at the first forward (the
  prompt's: ``first forward``) and then each bucket's capture; ``ran_compiled``:
  false when the compile failed and the steps ran uncompiled;
- ``generate_tok_s``: tokens/s of ``hf-greedy``, ``hf-static`` (transformers'
  static cache, compiled by transformers on CUDA; ``--no-hf-static`` skips its
  compile) and specdec's ``none`` for each kind, interleaved, medians of the
  repeats after the first.

The JSON is rewritten after each part, so a run cut short keeps what it
measured. ``--small`` shrinks the models to check the script on a CPU. The
projection of speculative methods from CPU traces is ``scripts/project_gpu.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from specdec import SpeculativeGenerator, kvcache, static
from specdec.bench.harness import hf_runner, specdec_runner

# hidden, intermediate, layers, heads, kv heads, vocab, tied (Qwen2.5 sizes, as in specdec.catalogue)
SIZES = {
    "0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "7b": (3584, 18944, 28, 28, 4, 152064, False),
}
SMALL = (64, 128, 2, 4, 2, 1000, True)
PROMPT_TOKENS = 300


def random_model(shape: tuple, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    hidden, inter, layers, heads, kv, vocab, tied = shape
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32768,
        tie_word_embeddings=tied,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class Timer:
    """Wall time between device synchronisations."""

    def __init__(self, device: torch.device) -> None:
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def __call__(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def open_kind(model, kind: str) -> kvcache.KVCache:
    """The engine's cache of ``kind``: ``eager`` (dynamic), ``static`` (graphs on CUDA) or ``compiled``."""
    if kind == "eager":
        return kvcache.DynamicKV(model)
    return static.StaticKV(model, compile_steps=kind == "compiled")


def capture_key(kind: str) -> str:
    """The key of ``kind``'s capture (and compile) seconds in :func:`step_ms`'s result."""
    return "capture_s" if kind == "static" else f"{kind}_capture_s"


def step_ms(model, prompt: list[int], rows: tuple[int, ...], timer: Timer, repeats: int, kinds: list[str]) -> dict:
    """Median ms of one step over ``R`` rows on the cached prompt for each kind; capture (and compile) seconds."""
    device = next(model.parameters()).device
    star = {}  # a root with r-1 children (a Medusa tree's first level): row i sees the root and itself
    for r in rows:
        star[r] = torch.eye(r, dtype=torch.bool)
        star[r][:, 0] = True
    gen = torch.Generator().manual_seed(1)
    out: dict = {capture_key(kind): {} for kind in kinds if kind != "eager"}
    with torch.inference_mode():
        for kind in kinds:
            kv = open_kind(model, kind)
            kv.start(len(prompt) + max(rows) + 8)
            first = kv.forward(torch.tensor(prompt, device=device))
            if first.captured:  # compiled steps compile every width at the first forward
                out[capture_key(kind)]["first forward"] = round(first.captured, 3)
            times: dict[int, list[float]] = {r: [] for r in rows}
            for rep in range(repeats + 2):  # two warm-up rounds (the first captures)
                for r in rows:
                    ids = torch.randint(model.config.vocab_size, (r,), generator=gen).to(device)
                    pos = torch.full((r,), len(prompt), device=device) + (torch.arange(r, device=device) > 0)
                    seconds, fwd = timer(
                        lambda: kv.forward(ids, pos if r > 1 else None, star[r] if r > 1 else None, keep=r)
                    )
                    if fwd.captured:
                        out[capture_key(kind)][str(r)] = round(fwd.captured, 3)
                    times[r].append(seconds - fwd.captured)
                    kv.truncate(len(prompt))
            out[kind] = {str(r): round(statistics.median(v[2:]) * 1e3, 3) for r, v in times.items()}
            if kind == "compiled":  # False after a failed compile (one log line): the steps then ran uncompiled
                out["ran_compiled"] = kv.compiled
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU by default")
    ap.add_argument("--targets", default="1.5b,7b", help="target sizes, each with the 0.5b draft")
    ap.add_argument("--kinds", default="eager,static", help="step kinds: eager, static, compiled")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="generation repeats (the first warms up)")
    ap.add_argument("--step-repeats", type=int, default=15)
    ap.add_argument("--no-hf-static", dest="hf_static", action="store_false", help="skip hf-static (its compile)")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-profile.json"))
    ap.add_argument("--small", action="store_true", help="tiny models: check the script on a CPU")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    timer = Timer(device)
    res: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype),
        "prompt_tokens": PROMPT_TOKENS,
        "max_new_tokens": args.max_new_tokens,
        "buckets": static.BUCKETS,
        "kinds": kinds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1), flush=True)

    draft = random_model(SMALL if args.small else SIZES["0.5b"], device, dtype, 1)
    vocab = draft.config.vocab_size
    segment = torch.randint(vocab, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = (segment * 6)[:PROMPT_TOKENS]  # repeats itself, so prompt lookup finds matches
    # up to 64 rows: a draft tree's forwards hold a depth's likeliest nodes and their ancestors (up to ~40 rows)
    res["draft_step_ms"] = step_ms(draft, prompt, static.BUCKETS[:7], timer, args.step_repeats, kinds)
    save()
    for size in args.targets.split(","):
        shape = SMALL if args.small else SIZES[size]
        target = random_model(shape, device, dtype, 0)
        # up to 128 rows: the widest lookahead window of the GPU profiles (W=15, N=5, G=15) verifies 121
        part: dict = {"step_ms": step_ms(target, prompt, static.BUCKETS[:8], timer, args.step_repeats, kinds)}
        res[size] = part
        save()
        t0 = time.perf_counter()
        gens = {
            f"specdec-none-{kind}": SpeculativeGenerator(
                target, method="none", static_cache=kind != "eager", compile_steps=kind == "compiled"
            )
            for kind in kinds
        }
        runners = {
            "hf-greedy": hf_runner(target, eos_token_ids=()),  # no EOS: every run makes n tokens
            **{name: specdec_runner(gen) for name, gen in gens.items()},
        }
        if args.hf_static:
            runners["hf-static"] = hf_runner(target, eos_token_ids=(), cache_implementation="static")
        tok_s: dict[str, list[float]] = {name: [] for name in runners}
        first_s: dict[str, float] = {}
        capture_s: dict[str, float] = {}  # of the first run: capture (and compile) is one-time work
        for rep in range(args.repeats):
            order = list(runners)[rep % len(runners) :] + list(runners)[: rep % len(runners)]
            for name in order:
                run = runners[name](prompt, args.max_new_tokens)
                tok_s[name].append(len(run.token_ids) / run.seconds)
                first_s.setdefault(name, run.seconds)
                if name in gens and gens[name].static_cache:
                    capture_s.setdefault(name, round(gens[name].last_stats.graph_capture_seconds, 3))
        part["generate_tok_s"] = {name: round(statistics.median(v[1:] or v), 2) for name, v in tok_s.items()}
        part["first_run_s"] = {name: round(v, 2) for name, v in first_s.items()}  # includes capture / compile
        part["graph_capture_s"] = capture_s
        part["generate_wall_s"] = round(time.perf_counter() - t0, 1)
        save()
        del target, gens, runners
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
