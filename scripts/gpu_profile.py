"""Where a decode step's time goes, on models of the reference sizes with random weights.

    python scripts/gpu_profile.py --device cuda --out runs/gpu-profile.json [--profiler DIR]

Builds Qwen2.5-Coder-1.5B- and 0.5B-shaped models with random weights on the
device (copying the real weights to a lent GPU takes most of a loan; timings
do not depend on the weights, acceptance does, so accepted lengths here mean
nothing) and measures, in one process:

- ``forward_ms``: one target forward over ``k`` new rows on a cached prompt,
  with transformers' own causal mask (``chain``) and under the engine's 4D
  tree mask (``tree``), and the draft's one-row forward; medians between CUDA
  synchronisations;
- ``generate``: tokens/s of transformers' greedy decoding and of each specdec
  method, interleaved, medians of the repeats after the first;
- ``split``: per step, the time inside the target forward (synchronised
  hooks) and the engine's work outside it.

``--profiler DIR`` also writes torch.profiler tables (``DIR/profile_<method>.txt``).
``--small`` shrinks the models to check the script on a CPU. Speed figures
belong to the machine they ran on: compare them within one run.
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

from specdec import SpeculativeGenerator, kvcache
from specdec.bench import hf_runner, specdec_runner
from specdec.medusa.heads import MedusaHeads
from specdec.proposers.base import Draft

SIZES = {"target": (1536, 8960, 28, 12), "draft": (896, 4864, 24, 14)}  # hidden, intermediate, layers, heads
SMALL = (64, 128, 2, 4)


def random_model(shape: tuple[int, int, int, int], vocab: int, device: torch.device, dtype: torch.dtype, seed: int):
    hidden, inter, layers, heads = shape
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True)
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
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def forward_ms(model, prompt: list[int], rows: tuple[int, ...], timer: Timer, repeats: int) -> dict[str, float]:
    """Median ms of one forward over ``k`` new rows on the cached prompt, chain and tree mask."""
    device = next(model.parameters()).device
    arg = kvcache.cache_argument(model)
    cache = kvcache.new_cache(model)
    plen = len(prompt)
    engine = SpeculativeGenerator(model, method="none")
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1, **{arg: cache})
        for _ in range(repeats + 2):  # two warm-up rounds
            for k in rows:
                for kind in ("chain", "tree") if k > 1 else ("chain",):
                    ids = torch.randint(model.config.vocab_size, (1, k), generator=gen).to(device)
                    kw = {}
                    if kind == "tree":  # a root with k-1 children (a star), as a Medusa tree's first level
                        parents = torch.cat([torch.tensor([-1]), torch.zeros(k - 2, dtype=torch.long)])
                        pos, mask = engine._tree_inputs(Draft(tokens=ids[0, 1:], parents=parents), plen, plen)
                        kw = {"position_ids": pos, "attention_mask": mask}
                    seconds, _ = timer(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=k, **kw,
                                                     **{arg: cache}))
                    times.setdefault(f"{kind} {k}", []).append(seconds)
                    kvcache.truncate(cache, plen)
    return {key: round(statistics.median(v[2:]) * 1e3, 2) for key, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16 on a GPU, float32 on a CPU by default")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=4, help="generation repeats (the first warms up)")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-profile.json"))
    ap.add_argument("--profiler", type=Path, default=None)
    ap.add_argument("--small", action="store_true", help="tiny models: check the script on a CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    vocab = 1000 if args.small else 151936
    target = random_model(SMALL if args.small else SIZES["target"], vocab, device, dtype, 0)
    draft = random_model(SMALL if args.small else SIZES["draft"], vocab, device, dtype, 1)
    segment = torch.randint(vocab, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = (segment * 5)[:300]  # repeats itself, so prompt lookup finds matches
    timer = Timer(device)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
                 "prompt_tokens": len(prompt), "max_new_tokens": args.max_new_tokens}
    res["forward_ms"] = {"target": forward_ms(target, prompt, (1, 2, 4, 8, 16, 32, 64), timer, 15),
                         "draft": forward_ms(draft, prompt, (1,), timer, 15)}
    print(json.dumps(res, indent=1), flush=True)

    gens = {"none": SpeculativeGenerator(target, method="none"),
            "prompt_lookup": SpeculativeGenerator(target, method="prompt_lookup"),
            "lookahead": SpeculativeGenerator(target, method="lookahead"),
            "draft": SpeculativeGenerator(target, method="draft", draft=draft),
            "medusa": SpeculativeGenerator(target, method="medusa", medusa_heads=MedusaHeads.init(target, num_heads=4))}
    n = args.max_new_tokens
    runners = {"hf-greedy": hf_runner(target, eos_token_ids=()),  # the random models have no EOS: n tokens each
               **{name: specdec_runner(gen) for name, gen in gens.items()}}
    tok_s: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(args.repeats):
        order = list(runners)[rep % len(runners):] + list(runners)[: rep % len(runners)]  # rotate who goes first
        for name in order:
            run = runners[name](prompt, n)
            tok_s[name].append(len(run.token_ids) / run.seconds)
    res["generate_tok_s"] = {name: round(statistics.median(v[1:]), 2) for name, v in tok_s.items()}

    res["split_ms_per_step"] = {}
    for name, gen in gens.items():
        inside: list[float] = []

        def before(*_):
            timer.sync()
            inside.append(-time.perf_counter())

        def after(*_):
            timer.sync()
            inside[-1] += time.perf_counter()

        hooks = [target.register_forward_pre_hook(before), target.register_forward_hook(after)]
        try:
            seconds, r = timer(lambda: gen.generate(prompt, max_new_tokens=n, eos_token_id=[]))
        finally:
            for h in hooks:
                h.remove()
        steps = r.stats.steps - 1  # the first step is the prefill
        total = (seconds - inside[0]) / steps * 1e3
        forward = sum(inside[1:]) / steps * 1e3
        res["split_ms_per_step"][name] = {"total": round(total, 2), "target_forward": round(forward, 2),
                                          "outside": round(total - forward, 2)}
    print(json.dumps({k: res[k] for k in ("generate_tok_s", "split_ms_per_step")}, indent=1), flush=True)

    if args.profiler:
        from torch.profiler import ProfilerActivity, profile

        args.profiler.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name in ("none", "prompt_lookup", "medusa"):
            with profile(activities=activities) as prof:
                timer(lambda: gens[name].generate(prompt, max_new_tokens=64, eos_token_id=[]))
            (args.profiler / f"profile_{name}.txt").write_text(
                prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
