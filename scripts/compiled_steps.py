"""Step ms of a model on the static path, uncompiled against compiled (``compile_steps``), on any device.

    python scripts/compiled_steps.py [--model smollm2-135m] [--dtype float32] [--rows 1,8] [--passes 2]

Each pass times, for each row count and kind, the median of 30 steps over a 200-token cache (the cache is
cropped back after each step); the first pass's first call of a compiled kind holds its compile (its seconds
and how many graphs it compiled are printed). Figures in docs/gpu.md ("Compiled steps").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec.loading import load_model
from specdec.static import StaticKV, compiled_graphs


def run(kv: StaticKV, rows: int, steps: int = 30) -> tuple[float, int, float]:
    """Seconds of the first call, graphs compiled by it, and the median ms of the next ``steps`` calls."""
    kv.start(512)
    kv.forward(torch.arange(100, 300, device=kv.device))
    compiles, t0 = compiled_graphs(), time.perf_counter()
    kv.forward(torch.arange(rows, device=kv.device))
    first, compiled = time.perf_counter() - t0, compiled_graphs() - compiles
    kv.truncate(200)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        kv.forward(torch.arange(rows, device=kv.device) + i)
        if kv.device.type == "cuda":
            torch.cuda.synchronize(kv.device)
        times.append(time.perf_counter() - t0)
        kv.truncate(200)
    return first, compiled, statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    kinds = {"static": StaticKV(model), "compiled": StaticKV(model, compile_steps=True)}
    with torch.inference_mode():
        for n in range(args.passes):
            for rows in map(int, args.rows.split(",")):
                for name, kv in kinds.items():
                    first, compiled, ms = run(kv, rows)
                    print(
                        f"pass {n + 1} {args.dtype} rows {rows} {name}: median {ms:.2f} ms"
                        f" (first call {first:.1f} s, {compiled} graphs compiled)",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
