"""Helpers of scripts/webui_e2e.sh: prepare the models, wait for the API, run the prompt suite, print the table.

Runs with the webui's Python (specdec installed there by install.py). Only
``prepare-model`` imports specdec and transformers; the others use the
standard library and talk to the webui's OpenAI-compatible API on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# (name, kind, messages): a free question, a rewrite, a summary and a long chat turn
SUITE: list[tuple[str, str, list[dict[str, str]]]] = [
    (
        "free-tea",
        "free",
        [{"role": "user", "content": "What are the main differences between green tea and black tea?"}],
    ),
    ("free-rome", "free", [{"role": "user", "content": "Why did the Roman Empire split into east and west?"}]),
    (
        "rewrite-email",
        "rewrite",
        [
            {
                "role": "user",
                "content": (
                    "Rewrite this email so it sounds more polite, keeping every detail:\n\nHi Tom, the report you sent on Monday "
                    "is missing the sales numbers for March and April. Send them by Friday. Also the chart on page three uses the "
                    "wrong colours, fix it. And stop cc-ing the whole team on every message, only Anna and me need to see these. "
                    "Thanks, Lisa"
                ),
            }
        ],
    ),
    (
        "summary-notes",
        "summary",
        [
            {
                "role": "user",
                "content": (
                    "Summarize these meeting notes in three bullet points:\n\nThe team met on Tuesday to plan the spring release. "
                    "Maria said the new search page is finished but still needs review from the design team. Paul reported that "
                    "the payment bug from last week is fixed and the fix is already deployed. The release date was moved from "
                    "April 3 to April 10 because the mobile app needs one more week of testing. Everyone agreed to hold a short "
                    "check-in every morning until the release."
                ),
            }
        ],
    ),
    (
        "chat-turn",
        "chat",
        [
            {
                "role": "user",
                "content": "I have this function:\n\ndef average(values):\n    total = 0\n    for value in values:\n"
                "        total += value\n    return total / len(values)",
            },
            {
                "role": "assistant",
                "content": "It returns the mean of the list, but it fails with ZeroDivisionError on an empty list.",
            },
            {"role": "user", "content": "Fix that and rename total to running_sum. Show the whole function."},
        ],
    ),
]


def prepare_model(name: str, folder: Path, fixed: Path | None, eos_token: str) -> None:
    """Save packaged model ``name`` as the float32 folder users get, and a copy whose tokenizer EOS/pad is ``eos_token``.

    The GGUF conversion of transformers can name another EOS than the model's
    config (smollm2-135m: the tokenizer says ``<|im_start|>``, config and
    generation config ``<|im_end|>``); the first folder keeps that as users
    meet it, the corrected copy sets the tokenizer's EOS and pad to ``eos_token``.
    """
    if (folder / "config.json").is_file():
        print(f"model folder {folder} already exists")
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from specdec.loading import load_model

        model, tokenizer = load_model(name, dtype="float32", device="cpu")
        config = model.config
        if hasattr(config, "quantization_config"):  # dequantised from GGUF: save plain weights
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"saved {name} to {folder}")
    if fixed is None:
        return
    if (fixed / "config.json").is_file():
        print(f"model folder {fixed} already exists")
        return
    from transformers import AutoTokenizer

    shutil.copytree(folder, fixed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    print(
        f"{folder.name}: tokenizer EOS {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), pad {tokenizer.pad_token!r}"
    )
    tokenizer.eos_token = tokenizer.pad_token = eos_token
    tokenizer.save_pretrained(fixed)
    print(f"saved {fixed} with tokenizer EOS and pad {eos_token!r}")


def wait(port: int, timeout: float, log: Path | None) -> None:
    """Wait until the API answers with a model loaded (exit 1 on timeout)."""
    url = f"http://127.0.0.1:{port}/v1/internal/model/info"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                info = json.load(r)
                if info.get("model_name") not in (None, "None"):
                    print(f"API up, model {info['model_name']}")
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        time.sleep(2)
    print(f"the webui API did not come up in {timeout:.0f} s", file=sys.stderr)
    if log and log.is_file():
        print("".join(log.read_text(errors="replace").splitlines(True)[-40:]), file=sys.stderr)
    sys.exit(1)


def _chat_completion(port: int, messages: list[dict[str, str]], max_tokens: int, **fields: object):
    """A greedy ``/v1/chat/completions`` request to the webui on ``port`` (``fields``: more request fields)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 0, **fields}
    return urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def request(port: int, messages: list[dict[str, str]], max_tokens: int, **extra: object) -> dict:
    """One greedy chat completion through the API; text, token counts and wall time seen by the client.
    ``extra``: more request fields (the webui's own, such as ``truncation_length``)."""
    req = _chat_completion(port, messages, max_tokens, stream=False, **extra)
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=1800) as r:
        reply = json.load(r)
    seconds = time.perf_counter() - start
    return {
        "text": reply["choices"][0]["message"]["content"],
        "tokens": reply["usage"]["completion_tokens"],
        "prompt_tokens": reply["usage"]["prompt_tokens"],
        "seconds": seconds,
        "finish_reason": reply["choices"][0].get("finish_reason"),
    }


def streamed_request(port: int, messages: list[dict[str, str]], max_tokens: int, **extra: object) -> dict:
    """:func:`request` streamed: also the seconds until the first piece of the reply arrives."""
    req = _chat_completion(port, messages, max_tokens, stream=True, stream_options={"include_usage": True}, **extra)
    text, first, usage = "", None, {}
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=1800) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
    return {
        "text": text,
        "tokens": usage.get("completion_tokens", 0),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "seconds": time.perf_counter() - start,
        "first_token_seconds": first if first is not None else float("nan"),
    }


def suite(ports: dict[str, int], max_tokens: int, repeats: int, out: Path) -> None:
    """Both webuis side by side: their first replies, then every prompt of :data:`SUITE` ``repeats`` times.

    Requests alternate between the webui without (``off``) and with (``on``)
    the extension, the order flipping each round, so a slow spell of the
    machine hits both alike. Each prompt keeps its fastest time per side.
    """
    results: dict = {"first_reply": {}, "prompts": {}}
    for side, port in ports.items():
        first = request(port, SUITE[0][2], max_tokens)
        results["first_reply"][side] = first
        print(f"{side}: first reply {first['tokens']} tokens in {first['seconds']:.2f} s")
    for name, kind, messages in SUITE:
        entry: dict = {"kind": kind}
        for round_ in range(repeats):
            for side in list(ports) if round_ % 2 == 0 else list(reversed(ports)):
                r = request(ports[side], messages, max_tokens)
                seen = entry.setdefault(side, {"text": r["text"], "tokens": r["tokens"], "seconds": [], "same": True})
                seen["seconds"].append(r["seconds"])
                seen["same"] &= r["text"] == seen["text"]
        for side in ports:
            best = min(entry[side]["seconds"])
            print(
                f"{name} {side}: {entry[side]['tokens']} tokens, fastest {best:.2f} s "
                f"({entry[side]['tokens'] / best:.2f} tok/s)"
            )
        results["prompts"][name] = entry
    out.write_text(json.dumps(results, indent=2) + "\n")


KEPT = re.compile(r"specdec: output generated .*?, context (\d+), (\d+) kept from the reply before")


def kept_counts(log: str) -> list[tuple[int, int]]:
    """``(prompt tokens, tokens kept from the reply before)`` of each reply the extension logged, in order
    (the webui's log wraps long lines at spaces)."""
    return [(int(a), int(b)) for a, b in KEPT.findall(re.sub(r"\s+", " ", log))]


def limit(
    ports: dict[str, int], logs: dict[str, Path], turns: int, truncation: int, max_tokens: int, out: Path
) -> None:
    """One long chat per webui at a small ``truncation_length``, the turns alternating between them.

    Both run the extension: ``webui`` with the webui's own cut (one message at a time), ``blocks`` with
    *history_in_blocks*. The user's messages are the suite's, cycled; each side keeps its own replies.
    From each server's log: the prompt tokens of every reply and how many were kept from the reply
    before. Prints, over the second half of the chat (past the limit), the means per turn of the prompt
    tokens computed, the seconds to the first piece of the reply (streamed) and to its end.
    """
    messages = [m["content"] for _, _, chat in SUITE for m in chat if m["role"] == "user"]
    chats: dict[str, list[dict[str, str]]] = {side: [] for side in ports}
    seen: dict[str, list[dict]] = {side: [] for side in ports}
    for i in range(turns):
        for side in list(ports) if i % 2 == 0 else list(reversed(ports)):
            chats[side].append({"role": "user", "content": messages[i % len(messages)]})
            r = streamed_request(ports[side], chats[side], max_tokens, truncation_length=truncation)
            chats[side].append({"role": "assistant", "content": r["text"]})
            seen[side].append(r)
    results: dict = {"truncation_length": truncation, "max_tokens": max_tokens, "sides": {}}
    for side, log in logs.items():
        kept = kept_counts(log.read_text(errors="replace"))
        if len(kept) != turns:
            print(f"{side}: {len(kept)} specdec replies in {log} for {turns} turns", file=sys.stderr)
            sys.exit(1)
        for r, (context, cached) in zip(seen[side], kept):
            r.update(context=context, kept=cached, computed=context - cached)
        late = seen[side][turns // 2 :]
        summary = {
            key: sum(r[name] for r in late) / len(late)
            for key, name in (
                ("prompt_per_turn", "context"),
                ("computed_per_turn", "computed"),
                ("first_token_seconds_per_turn", "first_token_seconds"),
                ("seconds_per_turn", "seconds"),
            )
        }
        results["sides"][side] = {"summary": summary, "turns": seen[side]}
        print(
            f"{side}: over turns {turns // 2 + 1}-{turns}, per turn: prompt {summary['prompt_per_turn']:.0f} tokens, "
            f"computed {summary['computed_per_turn']:.0f}, first token after "
            f"{summary['first_token_seconds_per_turn']:.2f} s, reply in {summary['seconds_per_turn']:.2f} s"
        )
    out.write_text(json.dumps(results, indent=2) + "\n")


def table(runs: list[Path], min_free: float) -> int:
    """Print one table for the runs (one JSON per model); 1 on any difference or free chat below ``min_free``."""
    failed = False
    print("| model | prompt | tokens off/on | tok/s off | tok/s on | on/off | identical |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for run in runs:
        model = run.stem
        data = json.loads(run.read_text())
        free = {"off": [0, 0.0], "on": [0, 0.0]}
        for name, entry in data["prompts"].items():
            a, b = entry["off"], entry["on"]
            same = a["text"] == b["text"] and a["same"] and b["same"]
            failed |= not same
            ra, rb = a["tokens"] / min(a["seconds"]), b["tokens"] / min(b["seconds"])
            print(
                f"| {model} | {name} | {a['tokens']}/{b['tokens']} | {ra:.2f} | {rb:.2f} | {rb / ra:.2f}x | "
                f"{'yes' if same else 'NO'} |"
            )
            if entry["kind"] == "free":
                for side, r in (("off", a), ("on", b)):
                    free[side][0] += r["tokens"]
                    free[side][1] += min(r["seconds"])
            if not same:
                print(f"--- {model} {name} off ---\n{a['text']}\n--- on ---\n{b['text']}", file=sys.stderr)
        ratio = (free["on"][0] / free["on"][1]) / (free["off"][0] / free["off"][1])
        first = data["first_reply"]
        log = run.parent / f"server-{model}-on.log"  # written beside the run by webui_e2e.sh
        by_specdec = log.read_text(errors="replace").count("specdec: output generated") if log.exists() else None
        judged = by_specdec != 0  # every reply by the webui itself: on/off compares the webui with itself
        notes.append(
            f"{model}: first reply {first['off']['seconds']:.1f} s off, {first['on']['seconds']:.1f} s on "
            f"({first['on']['tokens']} tokens); free chat on/off {ratio:.2f}x"
            + ("" if judged else " (no reply by specdec: speed not judged)")
        )
        failed |= judged and ratio < min_free
    print("\n" + "\n".join(notes))
    print("result: " + (f"FAIL (a text differs or free chat is below {min_free:.2f}x)" if failed else "pass"))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-model")
    p.add_argument("name")
    p.add_argument("folder", type=Path)
    p.add_argument("--fixed", type=Path, help="also write a copy whose tokenizer EOS/pad is --eos-token")
    p.add_argument("--eos-token", default="<|im_end|>")
    p = sub.add_parser("wait")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--log", type=Path)
    p = sub.add_parser("suite")
    p.add_argument("--port-off", type=int, required=True)
    p.add_argument("--port-on", type=int, required=True)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("limit")
    p.add_argument("--port-webui", type=int, required=True)
    p.add_argument("--port-blocks", type=int, required=True)
    p.add_argument("--log-webui", type=Path, required=True)
    p.add_argument("--log-blocks", type=Path, required=True)
    p.add_argument("--turns", type=int, default=24)
    p.add_argument("--truncation-length", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("table")
    p.add_argument("runs", type=Path, nargs="+", help="one MODEL.json per model")
    p.add_argument("--min-free", type=float, default=0.95)
    args = parser.parse_args()
    if args.cmd == "prepare-model":
        prepare_model(args.name, args.folder, args.fixed, args.eos_token)
    elif args.cmd == "wait":
        wait(args.port, args.timeout, args.log)
    elif args.cmd == "limit":
        limit(
            {"webui": args.port_webui, "blocks": args.port_blocks},
            {"webui": args.log_webui, "blocks": args.log_blocks},
            args.turns,
            args.truncation_length,
            args.max_tokens,
            args.out,
        )
    elif args.cmd == "suite":
        suite({"off": args.port_off, "on": args.port_on}, args.max_tokens, args.repeats, args.out)
    else:
        return table(args.runs, args.min_free)
    return 0


if __name__ == "__main__":
    sys.exit(main())
