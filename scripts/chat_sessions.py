"""Long chats as chat UIs and ``specdec-local chat`` run them: how much each turn computes, before and after.

    python scripts/chat_sessions.py limit [--context 2048] [--turns 40] [--new-tokens 48] [common options]
    python scripts/chat_sessions.py ui-requests [--turns 6] [--new-tokens 48] [common options]
    common options: [--model smollm2-135m] [--method prompt_lookup] [--dtype bfloat16] [--threads 2]

``limit``: a chat at the context limit, cut the way ``chat`` and ``serve --fit-context`` cut it
(:func:`specdec.history.fit_history`), first with no headroom (only what the next reply needs leaves, what
``chat`` did before), then with the shipped :data:`~specdec.history.HEADROOM`. The model's context is set to
``--context`` so the limit comes after a few turns. Per side, over the turns from the first drop on: turns
that dropped exchanges, prompt tokens computed per turn (whose KV cache was not kept), prefill seconds.

``ui-requests``: chat UIs ask the same model for a title, tags or follow-up suggestions between turns, with
a task prompt that quotes the conversation. Each turn sends the whole conversation (the shared bench prompts
as user messages), then a follow-up request quoting it; run keeping one conversation's KV cache (what
specdec did before), then :data:`specdec.kvcache.CONVERSATIONS`. Per side, summed over the turns after the
first: the conversation's prompt tokens computed and its seconds to the first token.

Both sides run on the same loaded model, one after the other.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import specdec
from specdec import history, kvcache
from specdec.bench.harness import load_prompts
from specdec.loading import load_model

TASK = (
    "### Task:\nSuggest 3 short follow-up questions the user might ask next, one per line.\n"
    "### Chat history:\n{history}"
)


# --------------------------------------------------------------------------- limit
def at_the_limit(gen: specdec.SpeculativeGenerator, turns: int, new_tokens: int) -> dict:
    messages = [{"role": "system", "content": "Be brief."}]
    rows = []  # (exchanges dropped, prompt tokens, prompt tokens kept, prefill seconds)
    for i in range(turns):
        question = f"Question {i}: explain point {i} of the plan again, " + "in more detail " * 10
        messages.append({"role": "user", "content": question})
        ids, budget, dropped = history.fit_history(gen, messages, max_new_tokens=new_tokens)
        result = gen.generate(ids, max_new_tokens=budget)
        messages.append({"role": "assistant", "content": result.text})
        rows.append((dropped, len(ids), result.stats.cached_tokens, result.stats.prefill_seconds))
    first_drop = next((i for i, r in enumerate(rows) if r[0]), None)
    if first_drop is None:
        raise SystemExit("the conversation never reached the context: give more --turns or a smaller --context")
    limit = rows[first_drop:]
    return {
        "turns_at_the_limit": len(limit),
        "turns_with_a_drop": sum(1 for r in limit if r[0]),
        "tokens_computed_per_turn": round(sum(r[1] - r[2] for r in limit) / len(limit)),
        "prefill_s_per_turn": round(sum(r[3] for r in limit) / len(limit), 2),
        "prefill_s_most": round(max(r[3] for r in limit), 2),
    }


# --------------------------------------------------------------------------- ui-requests
def reply(gen: specdec.SpeculativeGenerator, messages: list[dict], new_tokens: int) -> tuple[str, float, int]:
    """The reply's text, seconds to its first token and the prompt tokens computed (not kept)."""
    start, first, text = time.perf_counter(), None, []
    for event in gen.stream(messages, max_new_tokens=new_tokens):
        if first is None and event.token_ids:
            first = time.perf_counter() - start
        text.append(event.text)
    stats = gen.last_stats
    return "".join(text), first or 0.0, stats.prompt_tokens - stats.cached_tokens


def with_ui_requests(gen: specdec.SpeculativeGenerator, turns: int, new_tokens: int) -> dict:
    messages: list[dict] = []
    computed, waited = 0, 0.0
    for i, prompt in enumerate(load_prompts()[:turns]):
        messages.append({"role": "user", "content": prompt.prompt})
        text, wait, new = reply(gen, messages, new_tokens)
        if i:
            computed, waited = computed + new, waited + wait
        messages.append({"role": "assistant", "content": text})
        quoted = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
        reply(gen, [{"role": "user", "content": TASK.format(history=quoted)}], 24)
    return {"turns_after_the_first": turns - 1, "prompt_tokens_computed": computed, "first_token_s": round(waited, 2)}


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=["limit", "ui-requests"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="prompt_lookup")
    ap.add_argument("--context", type=int, default=2048, help="limit: the context the model is given")
    ap.add_argument("--turns", type=int, default=None, help="default: 40 for limit, 6 for ui-requests")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if args.scenario == "limit":
        module, name, play, turns = history, "HEADROOM", at_the_limit, args.turns or 40
    else:
        module, name, play, turns = kvcache, "CONVERSATIONS", with_ui_requests, args.turns or 6
    shipped = getattr(module, name)
    for value in ({"HEADROOM": 0.0, "CONVERSATIONS": 1}[name], shipped):
        setattr(module, name, value)
        gen = specdec.SpeculativeGenerator(model, tokenizer, method=args.method)
        if args.scenario == "limit":
            gen.context_length = args.context
        print(json.dumps({name.lower(): value, **play(gen, turns, args.new_tokens)}), flush=True)
    setattr(module, name, shipped)


if __name__ == "__main__":
    main()
