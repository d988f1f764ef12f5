"""Project GPU tokens/s of the speculative methods from CPU step traces and measured GPU step costs.

    # 1. on a CPU, real models, greedy: what every step did
    python scripts/project_gpu.py trace --target qwen-coder-1.5b --draft qwen-coder-0.5b \\
        --out docs/bench/cpu-traces-qwen-coder-1.5b.json
    # 2. with a gpu_profile.py result: what those steps would cost there
    python scripts/project_gpu.py project --traces docs/bench/cpu-traces-qwen-coder-1.5b.json \\
        --costs runs/gpu-profile.json --target 1.5b

A trace records, per step, the target's rows (root, nodes, extra rows), the
row count of each draft forward, and the tokens the step produced. The
controllers choose draft and copy lengths by the GPU's prior row costs
(``--propose-as cuda``, the default: in bfloat16 greedy decoding they use the
prior alone, so the CPU proposes what a GPU run would), and ``--profile``
gives the methods a hardware profile's settings (lookahead W/N/G, the draft
length). Which tokens are accepted does not depend on the device (greedy, the same models),
so a step's GPU cost is its target step at the row bucket that holds it plus
its draft steps, each the static-path median that ``gpu_profile.py`` measured,
plus the per-step work outside the forwards measured there for plain decoding.
The result is a projection, labelled as such: it leaves out proposer work that
is heavier than plain decoding's and the prompt's prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.jsonl"


def trace(args: argparse.Namespace) -> None:
    import torch

    import specdec
    from specdec.bench.harness import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_prompts(args.prompts if args.prompts else (SHARED_PROMPTS if SHARED_PROMPTS.exists() else None))
    target, tokenizer = specdec.load_model(args.target, dtype=args.dtype, device="cpu")
    draft = specdec.load_model(args.draft, dtype=args.dtype, device="cpu")[0] if args.draft else None
    out: dict = {
        "target": args.target,
        "draft": args.draft,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "propose_as": args.propose_as,
        "profile": args.profile,
        "methods": {},
    }
    for method, label, settings in traced_methods(args):
        k, options = profile_choices(args, method)
        options.update(settings)
        if method in ("draft", "auto"):
            from specdec.proposers.draft_model import tree_nodes
            from specdec.proposers.options import DraftOptions

            if args.tree_nodes is not None:
                options["tree_nodes"] = args.tree_nodes
            nodes = tree_nodes(DraftOptions(**options), args.propose_as)
            label = f"{method} (tree of {nodes})" if nodes else method
        gen = specdec.SpeculativeGenerator(
            target,
            tokenizer,
            method=method,
            draft=draft if method in ("draft", "auto") else None,
            num_speculative_tokens=k,
            **options,
        )
        gen.cost_kind = args.propose_as  # the device whose row costs the controllers choose by
        steps: list[dict] = []
        draft_rows: list[int] = []
        model = getattr(getattr(gen.proposer, "kv", None), "model", None)
        hook = (
            model.register_forward_pre_hook(
                lambda m, a, k: draft_rows.append(int(k["input_ids"].shape[1])), with_kwargs=True
            )
            if model is not None
            else None
        )
        observe = gen.proposer.observe

        def record(outcome, observe=observe):
            steps.append(
                {
                    "rows": int(outcome.logits.shape[0]),
                    "draft": list(draft_rows),
                    "tokens": int(outcome.new_tokens.numel()),
                }
            )
            draft_rows.clear()
            observe(outcome)

        gen.proposer.observe = record
        runs = []
        try:
            for prompt in prompts:
                steps.clear()
                draft_rows.clear()
                ids = gen.encode([{"role": "user", "content": prompt.prompt}])
                res = gen.generate(ids, max_new_tokens=args.max_new_tokens)
                if draft_rows:  # the last step (not observed) still ran its forwards
                    steps.append({"rows": None, "draft": list(draft_rows), "tokens": None})
                runs.append(
                    {
                        "id": prompt.id,
                        "category": prompt.category,
                        "prompt_tokens": len(ids),
                        "new_tokens": res.stats.new_tokens,
                        "steps_total": res.stats.steps,
                        "cpu_tok_s": round(res.stats.tokens_per_second, 2),
                        "steps": list(steps),
                    }
                )
                print(
                    f"{label:<14} {prompt.id:<22} {res.stats.new_tokens:>4} tok {res.stats.steps:>4} steps "
                    f"{res.stats.tokens_per_second:6.2f} tok/s",
                    flush=True,
                )
        finally:
            if hook is not None:
                hook.remove()
        out["methods"][label] = runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))


def traced_methods(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """``(method, label, options)`` to trace: ``--methods`` as they are, then lookahead once per ``--lookahead``."""
    jobs: list[tuple[str, str, dict]] = [(method, method, {}) for method in args.methods.split(",") if method]
    for setting in args.lookahead:
        try:
            w, n, g = (int(v) for v in setting.split("/"))
        except ValueError:
            raise SystemExit(f"--lookahead takes W/N/G (for example 15/5/15), not {setting!r}") from None
        jobs.append(("lookahead", f"lookahead W={w} N={n} G={g}", {"window_size": w, "ngram_size": n, "guess_size": g}))
    return jobs


def profile_choices(args: argparse.Namespace, method: str) -> tuple[int | None, dict]:
    """``(num_speculative_tokens, method options)`` of ``--profile`` for ``method`` (none: the defaults)."""
    if not args.profile:
        return None, {}
    from specdec.hardware import GIB, assumed_gpu
    from specdec.profiles import profile_options, profile_settings

    arguments = profile_settings(args.profile, args.target, draft=args.draft, device=assumed_gpu(80 * GIB))
    k = arguments.num_speculative_tokens if method == "draft" else None
    return k, profile_options(method, arguments.selection)


def _cost(table: dict[str, float], rows: int) -> float:
    """ms of a forward over ``rows`` rows: the smallest measured bucket that holds them; beyond the widest, that
    bucket's cost plus the per-row slope between the two widest (a GPU's few extra ms where rows are nearly free,
    about proportional where they are not)."""
    sizes = sorted(int(k) for k in table)
    for s in sizes:
        if s >= rows:
            return table[str(s)]
    widest = table[str(sizes[-1])]
    if len(sizes) == 1:
        return widest * rows / sizes[-1]
    slope = max(widest - table[str(sizes[-2])], 0.0) / (sizes[-1] - sizes[-2])
    return widest + slope * (rows - sizes[-1])


def step_costs(
    costs: dict, target: str, kind: str = "static"
) -> tuple[dict[str, float], dict[str, float], float, float]:
    """Target and draft ms by row count, ms per step outside the forwards, and specdec-none's tokens/s,
    from a ``gpu_profile.py`` result.

    The costs of the static path's ``kind`` (``static``: captured eager kernels; ``compiled``: compiled, then
    captured) when the file has them; an older eager-only profile (``forward_ms``, one target
    size) gives the eager costs, its draft measured at one row and scaled like the target's rows.
    """
    if target in costs:
        if kind not in costs[target]["step_ms"]:
            raise SystemExit(f"{target} has no {kind!r} step costs in this file (it has {costs.get('kinds')})")
        table, none = costs[target]["step_ms"][kind], costs[target]["generate_tok_s"][f"specdec-none-{kind}"]
        return table, costs["draft_step_ms"][kind], max(1e3 / none - table["1"], 0.0), none
    fwd = costs["forward_ms"]
    table = {k.split()[1]: v for k, v in fwd["target"].items() if k.startswith("tree") or k == "chain 1"}
    draft = {r: fwd["draft"]["chain 1"] * v / table["1"] for r, v in table.items()}
    return table, draft, costs["split_ms_per_step"]["none"]["outside"], costs["generate_tok_s"]["none"]


def synthetic_costs(slope: float) -> dict[str, float]:
    """Step costs in one-row steps where each row beyond the first adds ``slope`` of one, at the static path's
    row buckets: ``{rows: 1 + slope * (bucket - 1)}``."""
    from specdec.static import BUCKETS

    return {str(b): 1.0 + slope * (b - 1) for b in BUCKETS}


def project(args: argparse.Namespace) -> None:
    methods: dict[str, list] = {}
    for path in args.traces:  # several files: their methods side by side
        methods.update(json.loads(Path(path).read_text())["methods"])
    if args.row_slope is not None:
        target, outside, none_tok_s = synthetic_costs(args.row_slope), 0.0, None
        draft = {rows: ms * (args.draft_ratio or 0.0) for rows, ms in target.items()}
        print(
            f"projection (not a measurement) with synthetic costs: a step of r rows costs 1 + {args.row_slope} x "
            f"(r - 1) one-row steps at its row bucket, a draft step {args.draft_ratio or 0.0} x that, no host work"
        )
    else:
        costs = json.loads(Path(args.costs).read_text())
        target, draft, outside, none_tok_s = step_costs(costs, args.target, args.kind)
        if args.draft_ratio is not None:
            draft = {rows: ms * args.draft_ratio for rows, ms in target.items()}
        print(
            f"projection (not a measurement) for target {args.target} on {costs['device']}: target step "
            f"{target['1']:.2f} ms at 1 row, draft step {draft['1']:.2f} ms"
            f"{f' (assumed: {args.draft_ratio} x the target step)' if args.draft_ratio is not None else ''}, "
            f"{outside:.2f} ms outside the forward"
        )
    plain_ms = target["1"] + outside  # a token of plain decoding, in the same units as the projection
    results = {}
    for method, runs in methods.items():
        by_cat: dict[str, list[float]] = {}
        steps = rows = tokens_all = 0
        for run in runs:
            ms = tokens = 0.0
            for i, step in enumerate(run["steps"]):
                drafts = step["draft"][1:] if i == 0 else step["draft"]  # the first draft forward is its prefill
                ms += sum(_cost(draft, r) for r in drafts)
                if step["rows"] is not None:
                    ms += _cost(target, step["rows"]) + outside
                    tokens += step["tokens"]
                    steps, rows = steps + 1, rows + step["rows"]
            tokens_all += tokens
            by_cat.setdefault(run["category"], []).append(tokens / ms * plain_ms)  # x plain decoding
        every = [v for vs in by_cat.values() for v in vs]
        results[method] = {
            "all": statistics.geometric_mean(every),
            **{c: statistics.geometric_mean(v) for c, v in by_cat.items()},
            "per step": (tokens_all / steps, rows / steps),
        }
    cats = sorted({c for r in results.values() for c in r if c not in ("all", "per step")})
    print(
        "ratios against plain decoding projected the same way"
        + (f"; tok/s = ratio x specdec-none measured there ({none_tok_s:.0f} tok/s)" if none_tok_s else "")
    )
    print(f"| method | tokens / target rows per step | all | {' | '.join(cats)} |")
    print("|---|---|---|" + "---|" * len(cats))
    for method, r in results.items():
        cells = [
            (f"{r[c]:.2f}x ({r[c] * none_tok_s:.0f} tok/s)" if none_tok_s else f"{r[c]:.2f}x") if c in r else ""
            for c in ["all", *cats]
        ]
        tokens, rows = r["per step"]
        print(f"| {method} | {tokens:.2f} / {rows:.1f} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="record step traces on the CPU")
    t.add_argument("--target", default="qwen-coder-1.5b")
    t.add_argument("--draft", default="qwen-coder-0.5b")
    t.add_argument("--methods", default="draft,prompt_lookup,lookahead")
    t.add_argument("--prompts", default=None, help="a .jsonl prompt file (default: the shared set)")
    t.add_argument("--dtype", default="bfloat16")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument(
        "--propose-as", default="cuda", help="whose prior row costs the controllers use (specdec.costs.PRIORS)"
    )
    t.add_argument("--profile", default=None, help="a hardware profile whose method settings to use (gpu-24gb...)")
    t.add_argument(
        "--tree-nodes",
        type=int,
        default=None,
        help="the draft method's tree_nodes (0 = chains; default: chosen by --propose-as); a tree names the method",
    )
    t.add_argument(
        "--lookahead",
        action="append",
        default=[],
        metavar="W/N/G",
        help="also trace lookahead with this window, n-gram size and guess size (repeatable)",
    )
    t.add_argument("--out", required=True)
    p = sub.add_parser("project", help="project GPU tokens/s from traces and gpu_profile.py costs")
    p.add_argument("--traces", required=True, nargs="+", help="trace files (their methods side by side)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--costs", help="a gpu_profile.py result")
    source.add_argument(
        "--row-slope",
        type=float,
        help="instead of measured costs: each row beyond the first adds this fraction of a one-row step",
    )
    p.add_argument("--target", default="1.5b", help="which target of the costs file (1.5b, 7b)")
    p.add_argument("--kind", default="static", help="which static path's costs: static or compiled")
    p.add_argument(
        "--draft-ratio",
        type=float,
        default=None,
        help="assume a draft step costs this x the target step at each row count (instead of the measured draft)",
    )
    args = ap.parse_args()
    trace(args) if args.command == "trace" else project(args)


if __name__ == "__main__":
    main()
