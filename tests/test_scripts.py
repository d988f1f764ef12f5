"""The prepared GPU scripts run end to end on a CPU with tiny models, so a lent GPU's minutes are not spent
finding an error a CPU would have shown (``scripts/gpu_session.sh`` runs them there)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def _profile(costs: Path, *args: str) -> dict:
    """``gpu_profile.py`` on the CPU with tiny models and few repeats; its JSON."""
    profile = _run(
        "scripts/gpu_profile.py",
        *("--device", "cpu", "--small", "--max-new-tokens", "8", "--repeats", "2", "--step-repeats", "2"),
        *("--out", str(costs), *args),
    )
    assert profile.returncode == 0, profile.stderr[-2000:]
    return json.loads(costs.read_text())


def test_gpu_profile_and_projection_run_on_a_cpu(tmp_path):
    costs = tmp_path / "gpu-profile.json"
    measured = _profile(costs, "--targets", "1.5b,7b")
    for part in (measured["1.5b"]["step_ms"], measured["7b"]["step_ms"], measured["draft_step_ms"]):
        assert {"eager", "static", "capture_s"} <= set(part) and part["static"]["1"] > 0
    assert "128" in measured["1.5b"]["step_ms"]["static"]  # the widest lookahead window of the GPU profiles
    assert set(measured["1.5b"]["generate_tok_s"]) >= {"hf-greedy", "specdec-none-eager", "specdec-none-static"}
    projected = _run(
        "scripts/project_gpu.py",
        *("project", "--traces", "docs/bench/cpu-traces-qwen-coder-1.5b-as-cuda.json", "--costs", str(costs)),
    )
    assert projected.returncode == 0, projected.stderr[-2000:]
    assert "projection (not a measurement)" in projected.stdout and "| lookahead |" in projected.stdout
    # two trace files side by side, the draft's step assumed at 0.3x the target's
    traces = (  # the files scripts/gpu_session.sh projects from
        "docs/bench/cpu-traces-qwen-coder-1.5b-as-cuda.json",
        "docs/bench/cpu-traces-qwen-coder-1.5b-draft-trees.json",
        "docs/bench/cpu-traces-qwen-coder-1.5b-lookahead-windows.json",
    )
    projected = _run(
        "scripts/project_gpu.py", *("project", "--traces", *traces, "--costs", str(costs), "--draft-ratio", "0.3")
    )
    assert projected.returncode == 0, projected.stderr[-2000:]
    assert "assumed: 0.3 x the target step" in projected.stdout
    assert "| lookahead |" in projected.stdout and "| draft (tree of 31) |" in projected.stdout
    assert "| lookahead W=15 N=5 G=15 |" in projected.stdout
    assert all(t in (ROOT / "scripts" / "gpu_session.sh").read_text() for t in traces)


def test_gpu_profile_of_compiled_steps_and_its_projection_run_on_a_cpu(tmp_path):
    """The second device call's profile (``gpu_session.sh compiled``): steps compiled, then captured on CUDA."""
    costs = tmp_path / "gpu-profile-compiled.json"
    measured = _profile(costs, "--targets", "1.5b", "--kinds", "compiled", "--no-hf-static")
    for part in (measured["1.5b"]["step_ms"], measured["draft_step_ms"]):
        assert set(part) == {"compiled", "compiled_capture_s", "ran_compiled"} and part["compiled"]["1"] > 0
        assert part["ran_compiled"] is True
    # every width compiles at the first forward (--small's target has the draft's shapes and reuses its steps)
    assert measured["draft_step_ms"]["compiled_capture_s"]["first forward"] > 0
    assert "specdec-none-compiled" in measured["1.5b"]["graph_capture_s"]
    args = ("--traces", "docs/bench/cpu-traces-qwen-coder-1.5b-as-cuda.json", "--costs", str(costs))
    projected = _run("scripts/project_gpu.py", "project", *args, "--kind", "compiled")
    assert projected.returncode == 0, projected.stderr[-2000:]
    assert "projection (not a measurement)" in projected.stdout and "| lookahead |" in projected.stdout
    refused = _run("scripts/project_gpu.py", "project", *args)  # this file has no captured eager kernels
    assert refused.returncode != 0 and "no 'static' step costs" in refused.stderr


def test_host_ops_counts_the_work_outside_the_forward():
    run = _run("scripts/host_ops.py", "--layers", "3", "--tokens", "12", "--repeats", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    methods = ["none", "prompt_lookup", "lookahead", "lookahead-wide", "draft", "draft-chain", "draft-tree"]
    assert [r["method"] for r in rows] == methods
    assert all(r["ops"] > 0 and r["host_ms"] > 0 and r["steps"] > 0 for r in rows)


def _project_gpu():
    spec = importlib.util.spec_from_file_location("project_gpu", ROOT / "scripts" / "project_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projected_costs_beyond_the_widest_bucket_follow_the_last_slope():
    cost = _project_gpu()._cost
    table = {"1": 10.0, "32": 11.0, "64": 12.0}
    assert cost(table, 1) == 10.0 and cost(table, 20) == 11.0 and cost(table, 64) == 12.0
    assert cost(table, 128) == 14.0  # 12 ms plus 64 rows at (12 - 11) / 32 ms a row
    assert cost({"1": 10.0}, 3) == 30.0  # one bucket: proportional


def test_trace_takes_lookahead_settings():
    args = argparse.Namespace(methods="draft", lookahead=["15/5/15"])
    jobs = _project_gpu().traced_methods(args)
    assert jobs == [
        ("draft", "draft", {}),
        ("lookahead", "lookahead W=15 N=5 G=15", {"window_size": 15, "ngram_size": 5, "guess_size": 15}),
    ]
    with pytest.raises(SystemExit, match="W/N/G"):
        _project_gpu().traced_methods(argparse.Namespace(methods="", lookahead=["15,5"]))


def test_projection_with_synthetic_row_costs():
    """``--row-slope 0``: rows free and no draft cost, so a method's ratio is its tokens per step."""
    trace = "docs/bench/cpu-traces-qwen-coder-1.5b-as-cuda.json"
    projected = _run("scripts/project_gpu.py", "project", "--traces", trace, "--row-slope", "0")
    assert projected.returncode == 0, projected.stderr[-2000:]
    assert "synthetic costs" in projected.stdout
    runs = json.loads((ROOT / trace).read_text())["methods"]["prompt_lookup"]
    per_prompt = [
        sum(s["tokens"] for s in r["steps"] if s["rows"]) / sum(1 for s in r["steps"] if s["rows"]) for r in runs
    ]
    row = next(line for line in projected.stdout.splitlines() if line.startswith("| prompt_lookup |"))
    assert f"| {statistics.geometric_mean(per_prompt):.2f}x |" in row


def test_the_webui_check_judges_speed_only_where_specdec_replied(tmp_path, capsys):
    """A model whose every reply the webui generated itself (a fallback) compares the webui with itself: its
    on/off speed is noise, not a verdict; a text that differs always fails."""
    spec = importlib.util.spec_from_file_location("webui_e2e", ROOT / "scripts" / "webui_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)

    def side(text: str, seconds: float) -> dict:
        return {"text": text, "same": True, "tokens": 48, "seconds": [seconds]}

    def run(model: str, replies_by_specdec: int, on_text: str = "a reply") -> Path:
        data = {
            "prompts": {"free": {"kind": "free", "off": side("a reply", 1.0), "on": side(on_text, 1.2)}},
            "first_reply": {"off": {"seconds": 1.0}, "on": {"seconds": 1.2, "tokens": 48}},
        }
        (tmp_path / f"{model}.json").write_text(json.dumps(data))
        (tmp_path / f"server-{model}-on.log").write_text("specdec: output generated ...\n" * replies_by_specdec)
        return tmp_path / f"{model}.json"

    assert e2e.table([run("fallback", 0)], min_free=0.95) == 0  # 0.83x, but no reply was specdec's
    assert "no reply by specdec: speed not judged" in capsys.readouterr().out
    assert e2e.table([run("slow", 3)], min_free=0.95) == 1
    assert e2e.table([run("differs", 0, on_text="another reply")], min_free=0.95) == 1
