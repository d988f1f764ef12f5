"""Tokens/s through `specdec-local serve` against the library call `generate` makes, side by side.

Starts a server process and loads the same model in this process with the same
options, then for every prompt of the bench set and every repeat runs, in
alternating order: the library (``gen.generate`` on the chat messages, what
``specdec-local generate`` calls), the API without streaming and the API
streamed (``openai`` client). Only one of them runs at a time, so each has the
machine to itself. Greedy, so all three must give the same text (checked).

    python scripts/serve_bench.py --dtype bfloat16 --threads 2 --max-tokens 128 --repeats 3 \
        --markdown docs/performance-server.md

Reported: tokens/s as the caller sees it (wall clock around the call: for the
API that includes HTTP, JSON, prompt tokenization and the worker hand-off),
per mode, and the ratio API / library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("library", "api", "api-stream")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "specdec.cli",
        "serve",
        "--target",
        args.target,
        "--method",
        args.method,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--port",
        str(port),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"), env=dict(os.environ, PYTHONUNBUFFERED="1")
    )


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    import urllib.request

    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit("the server did not start")


def run_once(mode: str, gen: Any, client: Any, model: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """``(text, new tokens, wall seconds)`` of one greedy answer to ``prompt``."""
    messages = [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    if mode == "library":
        res = gen.generate(messages, max_new_tokens=max_tokens, temperature=0.0)
        return res.text, res.stats.new_tokens, time.perf_counter() - start
    if mode == "api":
        res = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return res.choices[0].message.content, res.usage.completion_tokens, time.perf_counter() - start
    text, tokens = [], 0
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--method", default="prompt_lookup")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default=None, help="a .jsonl prompt file (default: the set shipped with specdec)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--server-log", default="serve_bench_server.log")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")
    import openai
    import torch

    import specdec
    from specdec.bench.harness import load_average, load_prompts
    from specdec.cli.common import quiet_libraries

    quiet_libraries()

    port = free_port()
    proc = start_server(args, port)
    try:
        gen = specdec.load(args.target, method=args.method, dtype=args.dtype, threads=args.threads)
        wait_ready(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        prompts = load_prompts(args.prompts)[: args.limit]
        for mode in MODES:  # warm-up, untimed
            run_once(mode, gen, client, args.target, prompts[0].prompt, 16)
        rows: list[dict[str, Any]] = []
        load_before = load_average()
        for r in range(args.repeats):
            for i, p in enumerate(prompts):
                order = MODES if (r + i) % 2 == 0 else tuple(reversed(MODES))
                texts = {}
                for mode in order:
                    text, tokens, seconds = run_once(mode, gen, client, args.target, p.prompt, args.max_tokens)
                    texts[mode] = text
                    rows.append({"prompt": p.id, "repeat": r, "mode": mode, "tokens": tokens, "seconds": seconds})
                    print(f"{p.id:24} {mode:11} {tokens:4} tokens {tokens / seconds:7.2f} tok/s", flush=True)
                if len(set(texts.values())) != 1:
                    print(f"  TEXT DIFFERS on {p.id}: {texts}", file=sys.stderr)
                    rows[-1]["text_differs"] = True
        load_after = load_average()
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    summary = summarize(rows)
    conditions = {
        "target": args.target,
        "method": args.method,
        "dtype": args.dtype,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "prompts": len(prompts),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": [load_before, load_after],
        "texts_equal": not any(row.get("text_differs") for row in rows),
    }
    print(json.dumps({"conditions": conditions, "summary": summary}, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(
            json.dumps({"conditions": conditions, "summary": summary, "rows": rows}, indent=1)
        )
    if args.markdown:
        Path(args.markdown).write_text(markdown(conditions, summary))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: tokens/s over all runs (total tokens / total seconds) and the median per-prompt ratio to the
    library's (each prompt's median seconds over repeats)."""
    out: dict[str, Any] = {}
    by = {}
    for row in rows:
        by.setdefault((row["mode"], row["prompt"]), []).append(row)
    prompts = sorted({row["prompt"] for row in rows})
    for mode in MODES:
        mine = [row for row in rows if row["mode"] == mode]
        total = sum(r["tokens"] for r in mine) / sum(r["seconds"] for r in mine)
        ratios = []
        for p in prompts:
            lib = statistics.median(r["tokens"] / r["seconds"] for r in by[("library", p)])
            this = statistics.median(r["tokens"] / r["seconds"] for r in by[(mode, p)])
            ratios.append(this / lib)
        out[mode] = {
            "tokens_per_second": total,
            "median_ratio_to_library": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
        }
    return out


def markdown(conditions: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = ["| mode | tokens/s (all runs) | per-prompt ratio to the library: median (min-max) |", "|---|---|---|"]
    for mode, s in summary.items():
        lines.append(
            f"| {mode} | {s['tokens_per_second']:.2f} | {s['median_ratio_to_library']:.3f} "
            f"({s['min_ratio']:.3f}-{s['max_ratio']:.3f}) |"
        )
    return "\n".join(lines) + "\n\nConditions: " + json.dumps(conditions) + "\n"


if __name__ == "__main__":
    main()
