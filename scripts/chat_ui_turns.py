"""A chat driven the way chat UIs drive a server: after each reply, a request with another prompt.

    python scripts/chat_ui_turns.py [--model smollm2-135m] [--method prompt_lookup] [--turns 6]
                                    [--new-tokens 48] [--dtype bfloat16] [--threads 2]

Chat UIs ask the same model for a title, tags or follow-up suggestions between turns, with a task prompt
that quotes the conversation. Each turn here sends the whole conversation (the bench prompts as user
messages, through the chat template), then a follow-up request whose prompt quotes it. Run twice on the
same loaded model: keeping one conversation's KV cache (what specdec did before) and keeping
:data:`specdec.kvcache.CONVERSATIONS`. Prints, per side, the conversation turns' prompt tokens computed
(not kept) and their seconds to the first token, summed over the turns after the first.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import specdec
from specdec import kvcache
from specdec.bench.harness import load_prompts
from specdec.loading import load_model

TASK = (
    "### Task:\nSuggest 3 short follow-up questions the user might ask next, one per line.\n"
    "### Chat history:\n{history}"
)


def first_token(gen: specdec.SpeculativeGenerator, messages: list[dict], new_tokens: int) -> tuple[str, float, int]:
    """The reply's text, seconds to its first token and the prompt tokens computed (not kept)."""
    start, first, text = time.perf_counter(), None, []
    for event in gen.stream(messages, max_new_tokens=new_tokens):
        if first is None and event.token_ids:
            first = time.perf_counter() - start
        text.append(event.text)
    stats = gen.last_stats
    return "".join(text), first or 0.0, stats.prompt_tokens - stats.cached_tokens


def play(gen: specdec.SpeculativeGenerator, turns: int, new_tokens: int) -> dict:
    messages: list[dict] = []
    computed, waited = 0, 0.0
    for i, prompt in enumerate(load_prompts()[:turns]):
        messages.append({"role": "user", "content": prompt.prompt})
        reply, wait, new = first_token(gen, messages, new_tokens)
        if i:
            computed, waited = computed + new, waited + wait
        messages.append({"role": "assistant", "content": reply})
        history = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
        first_token(gen, [{"role": "user", "content": TASK.format(history=history)}], 24)
    return {"prompt_tokens_computed": computed, "first_token_s": round(waited, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="prompt_lookup")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    kept = kvcache.CONVERSATIONS
    for conversations in (1, kept):
        kvcache.CONVERSATIONS = conversations
        gen = specdec.SpeculativeGenerator(model, tokenizer, method=args.method)
        result = play(gen, args.turns, args.new_tokens)
        print(json.dumps({"conversations_kept": conversations, "turns_after_the_first": args.turns - 1, **result}))
    kvcache.CONVERSATIONS = kept


if __name__ == "__main__":
    main()
