"""A multi-turn chat timed with and without prefix reuse, side by side in one process.

    python scripts/chat_turns.py [--model smollm2-135m] [--draft NAME] [--method auto] [--turns 8]
                                 [--new-tokens 96] [--dtype auto] [--out FILE.json]

Each turn sends the whole history (the way a chat UI or an OpenAI client does) plus the next message of the
bench prompt set, to two generators over the same loaded models: one keeps the last turn's KV
(``prefix_cache=True``, the default), one prefills everything again. Turns alternate between the two, so
both see the same machine load. The history is the first generator's replies; the script checks that both
replied the same and prints, per turn, the prompt and kept tokens, each side's time to the first token
and whole-turn seconds, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import specdec
from specdec.bench.harness import load_prompts


def timed(gen: specdec.SpeculativeGenerator, messages: list[dict], new_tokens: int) -> dict:
    """One greedy reply: its text and ids, seconds to the first streamed token and in all, kept tokens."""
    start = time.perf_counter()
    first = None
    ids: list[int] = []
    text = []
    for event in gen.stream(messages, max_new_tokens=new_tokens):
        if first is None and event.token_ids:
            first = time.perf_counter() - start
        ids += event.token_ids
        text.append(event.text)
        stats = event.stats
    return {
        "text": "".join(text),
        "ids": ids,
        "first_token_seconds": first,
        "seconds": time.perf_counter() - start,
        "prompt_tokens": stats.prompt_tokens,
        "cached_tokens": stats.cached_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    kept = specdec.load(args.model, draft=args.draft, method=args.method, dtype=args.dtype)
    again = specdec.SpeculativeGenerator(
        kept.target, kept.tokenizer, method=kept.method, draft=kept.draft, options=kept.options, prefix_cache=False
    )
    for gen in (kept, again):  # the first forwards of a process are slow: not in turn one
        gen.generate("Warm up.", max_new_tokens=8)
    prompts = [p.prompt for p in load_prompts()]
    messages: list[dict] = []
    rows = []
    print(f"{args.model} ({kept.target.dtype}), method {kept.method}, {args.new_tokens} new tokens per turn")
    print("turn  prompt  kept  first-token s (kept / again)  turn s (kept / again)  same")
    for turn in range(args.turns):
        messages.append({"role": "user", "content": prompts[turn % len(prompts)]})
        a = timed(kept, messages, args.new_tokens)
        b = timed(again, messages, args.new_tokens)
        row = {
            "turn": turn + 1,
            "prompt_tokens": a["prompt_tokens"],
            "cached_tokens": a["cached_tokens"],
            "first_token_seconds": [a["first_token_seconds"], b["first_token_seconds"]],
            "seconds": [a["seconds"], b["seconds"]],
            "same_reply": a["ids"] == b["ids"],
        }
        rows.append(row)
        print(
            f"{turn + 1:>4}  {a['prompt_tokens']:>6}  {a['cached_tokens']:>4}  "
            f"{a['first_token_seconds']:>6.2f} / {b['first_token_seconds']:>6.2f} "
            f"({b['first_token_seconds'] / a['first_token_seconds']:.2f}x)   "
            f"{a['seconds']:>6.2f} / {b['seconds']:>6.2f} ({b['seconds'] / a['seconds']:.2f}x)   {row['same_reply']}"
        )
        messages.append({"role": "assistant", "content": a["text"]})
    total = [sum(r["seconds"][i] for r in rows) for i in (0, 1)]
    first = [sum(r["first_token_seconds"][i] for r in rows) for i in (0, 1)]
    print(
        f"all turns: {total[0]:.1f}s kept vs {total[1]:.1f}s again ({total[1] / total[0]:.2f}x); "
        f"time to first token {first[0]:.1f}s vs {first[1]:.1f}s ({first[1] / first[0]:.2f}x)"
    )
    if args.out:
        config = {k: v for k, v in vars(args).items() if k != "out"}
        config.update(method=kept.method, dtype=str(kept.target.dtype), torch_threads=torch.get_num_threads())
        with open(args.out, "w") as f:
            json.dump({"config": config, "turns": rows}, f, indent=1)


if __name__ == "__main__":
    main()
