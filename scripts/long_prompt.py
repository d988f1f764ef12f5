"""Peak memory and prefill time of each method on one long prompt, each method in its own process.

    python scripts/long_prompt.py [--tokens 7000] [--model smollm2-135m] [--methods none,lookahead,...]

Prints one line per method: prefill seconds (``GenerationStats.prefill_seconds``), whole-run seconds and the
process's peak resident memory (``ru_maxrss``), plus the ratio of each to method ``none``. A fresh process per
method keeps one method's peak from hiding another's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one(model: str, method: str, tokens: int, new_tokens: int, static: bool) -> dict:
    import torch

    import specdec
    from specdec.medusa import MedusaHeads

    torch.set_num_threads(2)
    gen = specdec.load(model, method="none", dtype="float32", device="cpu")
    options = {"medusa_heads": MedusaHeads.init(gen.target, num_heads=3)} if method == "medusa" else {}
    if static:
        options["static_cache"] = True
    gen = specdec.SpeculativeGenerator(gen.target, gen.tokenizer, method=method, **options)
    text = " ".join(f"item {i % 97} of list {i // 97}:" for i in range(tokens))
    ids = gen.encode(text)[:tokens]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = gen.generate(ids, max_new_tokens=new_tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "prompt_tokens": len(ids),
        "prefill_seconds": res.stats.prefill_seconds,
        "seconds": res.stats.seconds,
        "peak_mib": peak / 1024,
        "peak_above_load_mib": (peak - base) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=7000)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--methods", default="none,prompt_lookup,lookahead,medusa")
    parser.add_argument("--static-cache", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.model, args.child, args.tokens, args.new_tokens, args.static_cache)))
        return
    rows = []
    for method in args.methods.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--model",
            args.model,
            "--tokens",
            str(args.tokens),
            "--new-tokens",
            str(args.new_tokens),
        ] + (["--static-cache"] if args.static_cache else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = rows[0]
    print(
        f"{'method':<15} {'prompt':>6} {'prefill s':>10} {'x':>5} {'total s':>8} {'peak MiB':>9} {'x':>5} "
        f"{'above load':>10} {'x':>5}"
    )
    for r in rows:
        print(
            f"{r['method']:<15} {r['prompt_tokens']:>6} {r['prefill_seconds']:>10.2f} "
            f"{r['prefill_seconds'] / ref['prefill_seconds']:>5.2f} {r['seconds']:>8.2f} {r['peak_mib']:>9.0f} "
            f"{r['peak_mib'] / ref['peak_mib']:>5.2f} {r['peak_above_load_mib']:>10.0f} "
            f"{r['peak_above_load_mib'] / max(ref['peak_above_load_mib'], 1):>5.2f}"
        )


if __name__ == "__main__":
    main()
