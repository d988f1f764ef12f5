"""Cost of a target forward by row count, and of a prompt, in each dtype on this machine.

    python scripts/row_costs.py [--model qwen-coder-1.5b] [--dtypes bfloat16,float32,float16]
                                [--rows 1,2,4,8,16,32,64] [--prompt-tokens 400] [--threads 2] [--repeats 3]

For each dtype (one fresh load each): the fastest of ``--repeats`` timed forwards over each row count on a
128-token cached prompt (:func:`specdec.costs.forward_cost`, the way the decode loop calls the model),
each as milliseconds and relative to one row, and the prefill speed of one ``--prompt-tokens`` prompt.
Prints one JSON line per dtype, after a line saying whether this CPU computes bfloat16/float16 natively
(:func:`specdec.devices.cpu_computes_natively`). These are the figures behind ``specdec.costs.PRIORS``
and the CPU's ``--dtype auto`` (docs/design.md, "Cost of a forward by row count").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specdec.costs import forward_cost
from specdec.devices import cpu_computes_natively
from specdec.loading import load_model


def measure(model_name: str, dtype: str, rows: list[int], prompt_tokens: int, repeats: int) -> dict:
    """Row costs (ms and relative) and prefill tokens/s of ``model_name`` in ``dtype`` on the CPU."""
    model, _ = load_model(model_name, dtype=dtype, device="cpu")
    seconds = forward_cost(model, rows, prompt_length=128, repeats=repeats)
    ids = torch.randint(1000, 20000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids[:, :32], logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        prefill = time.perf_counter() - start
    one = seconds[min(seconds)]
    return {
        "dtype": dtype,
        "ms": {k: round(v * 1000) for k, v in seconds.items()},
        "relative": {k: round(v / one, 2) for k, v in seconds.items()},
        "prefill_tokens_per_second": round(prompt_tokens / prefill, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen-coder-1.5b")
    parser.add_argument("--dtypes", default="bfloat16,float32,float16")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = {name: cpu_computes_natively(getattr(torch, name)) for name in ("bfloat16", "float16")}
    print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native": native}), flush=True)
    rows = [int(r) for r in args.rows.split(",")]
    for dtype in args.dtypes.split(","):
        print(json.dumps(measure(args.model, dtype, rows, args.prompt_tokens, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
