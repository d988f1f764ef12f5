"""Helpers of scripts/webui_e2e.sh: prepare a model, wait for the API, send a request, compare runs.

Runs with the webui's Python (specdec installed there by install.py). Only
the ``prepare-model`` step imports specdec; the others use the standard
library and talk to the webui's OpenAI-compatible API on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def prepare_model(name: str, folder: Path) -> None:
    """Save packaged model ``name`` as a float32 transformers folder the webui's Transformers loader can read."""
    if (folder / "config.json").is_file():
        print(f"model folder {folder} already exists")
        return
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


def request(port: int, prompt: str, max_tokens: int, out: Path | None) -> dict:
    """One greedy chat completion; returns text, token count and timing."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream": False,
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=1800) as r:
        reply = json.load(r)
    seconds = time.perf_counter() - start
    tokens = reply["usage"]["completion_tokens"]
    result = {
        "text": reply["choices"][0]["message"]["content"],
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "finish_reason": reply["choices"][0].get("finish_reason"),
    }
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{tokens} tokens in {seconds:.2f} s ({result['tokens_per_second']:.2f} tok/s)")
    return result


def compare(off_file: Path, on_file: Path, log_on: Path | None) -> int:
    """Print the comparison; exit status 1 when the texts differ."""
    off, on = json.loads(off_file.read_text()), json.loads(on_file.read_text())
    same = off["text"] == on["text"]
    print(f"texts identical: {'yes' if same else 'NO'}")
    print(f"extension off: {off['completion_tokens']} tokens, {off['tokens_per_second']:.2f} tok/s")
    print(f"extension on : {on['completion_tokens']} tokens, {on['tokens_per_second']:.2f} tok/s")
    if off["tokens_per_second"] > 0:
        print(f"speed-up     : {on['tokens_per_second'] / off['tokens_per_second']:.2f}x")
    if log_on and log_on.is_file():
        lines = [l.strip() for l in log_on.read_text(errors="replace").splitlines() if "specdec:" in l]
        print("extension log:" + "".join(f"\n  {l}" for l in lines[-4:]) if lines else "extension log: (no specdec lines!)")
    if not same:
        print("--- off ---\n" + off["text"] + "\n--- on ---\n" + on["text"])
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-model")
    p.add_argument("name")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("wait")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--log", type=Path)
    p = sub.add_parser("request")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path)
    p = sub.add_parser("compare")
    p.add_argument("off", type=Path)
    p.add_argument("on", type=Path)
    p.add_argument("--log-on", type=Path)
    args = parser.parse_args()
    if args.cmd == "prepare-model":
        prepare_model(args.name, args.folder)
    elif args.cmd == "wait":
        wait(args.port, args.timeout, args.log)
    elif args.cmd == "request":
        request(args.port, args.prompt, args.max_tokens, args.out)
    else:
        return compare(args.off, args.on, args.log_on)
    return 0


if __name__ == "__main__":
    sys.exit(main())
