"""A long chat at the context limit: how much each turn computes when exchanges leave, without and with headroom.

    python scripts/chat_limit.py [--model smollm2-135m] [--context 2048] [--turns 40] [--new-tokens 48]
                                 [--dtype bfloat16] [--threads 2]

The conversation is cut the way ``specdec-local chat`` cuts it (:func:`specdec.history.fit_history`): first
with no headroom (only what the next reply needs leaves, what chat did before), then with the shipped
:data:`~specdec.history.HEADROOM`. The model's context is set to ``--context`` so that the limit comes after a
few turns. Prints, per side, over the turns from the first drop on: how many turns dropped exchanges, the prompt
tokens computed per turn (those whose KV cache was not kept) and the prefill seconds per turn.
"""

from __future__ import annotations

import argparse
import json

import torch

import specdec
from specdec import history
from specdec.loading import load_model


def play(gen: specdec.SpeculativeGenerator, turns: int, new_tokens: int) -> list[tuple[int, int, int, float]]:
    """(exchanges dropped, prompt tokens, prompt tokens kept, prefill seconds) per turn."""
    messages = [{"role": "system", "content": "Be brief."}]
    rows = []
    for i in range(turns):
        question = f"Question {i}: explain point {i} of the plan again, " + "in more detail " * 10
        messages.append({"role": "user", "content": question})
        ids, budget, dropped = history.fit_history(gen, messages, max_new_tokens=new_tokens)
        result = gen.generate(ids, max_new_tokens=budget)
        messages.append({"role": "assistant", "content": result.text})
        rows.append((dropped, len(ids), result.stats.cached_tokens, result.stats.prefill_seconds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="prompt_lookup")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    shipped = history.HEADROOM
    for headroom in (0.0, shipped):
        history.HEADROOM = headroom
        gen = specdec.SpeculativeGenerator(model, tokenizer, method=args.method)
        gen.context_length = args.context
        rows = play(gen, args.turns, args.new_tokens)
        first_drop = next((i for i, r in enumerate(rows) if r[0]), None)
        if first_drop is None:
            raise SystemExit("the conversation never reached the context: give more --turns or a smaller --context")
        limit = rows[first_drop:]
        print(
            json.dumps(
                {
                    "headroom": headroom,
                    "turns_at_the_limit": len(limit),
                    "turns_with_a_drop": sum(1 for r in limit if r[0]),
                    "tokens_computed_per_turn": round(sum(r[1] - r[2] for r in limit) / len(limit)),
                    "prefill_s_per_turn": round(sum(r[3] for r in limit) / len(limit), 2),
                    "prefill_s_most": round(max(r[3] for r in limit), 2),
                }
            ),
            flush=True,
        )
    history.HEADROOM = shipped


if __name__ == "__main__":
    main()
