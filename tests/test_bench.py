"""The bench's plumbing on tiny random models: prompts, rows, JSON shape, arithmetic, table, plot, CLI.

Nothing here measures speed: timings on tiny models mean nothing, and speed
is shown by running ``specdec-local bench`` on real models.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from specdec.bench.harness import Bench, BenchConfig, BenchPrompt, RunResult, load_prompts, make_row
from specdec.bench.report import BASELINE, BenchReport, BenchRow, first_divergence, geometric_mean
from specdec.errors import MissingExtraError, SpecdecError, VocabularyMismatchError
from conftest import tiny_model

WORDS = [f"w{i}" for i in range(60)]
ROW_KEYS = [
    "prompt_id",
    "category",
    "method",
    "new_tokens",
    "seconds",
    "tokens_per_second",
    "speedup",
    "mean_accepted_length",
    "acceptance_rate",
    "identical",
    "first_divergence",
]


# --------------------------------------------------------------------------- fixtures
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def _model(seed: int = 0):
    """A tiny Llama on the CPU for the word tokenizer: BOS 1, EOS and pad 2."""
    return tiny_model("llama", seed=seed, vocab=len(WORDS) + 3, max_positions=256, bos=1, eos=2, pad=2, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return _model(), _tokenizer()


def _prompt_file(tmp_path: Path) -> Path:
    lines = [
        {"id": "copy-a", "category": "edit", "prompt": " ".join(WORDS[:12] + WORDS[:12])},
        {"id": "copy-b", "category": "edit", "prompt": " ".join(WORDS[5:20])},
        {"id": "chat-a", "category": "chat", "prompt": " ".join(WORDS[30:40])},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in lines))
    return path


def _row(pid: str, cat: str, method: str, speedup: float, tps: float = 10.0) -> BenchRow:
    return BenchRow(pid, cat, method, 8, 8 / tps, tps, speedup, None, None, True, None)


# --------------------------------------------------------------------------- prompts
def test_shipped_prompts_load():
    prompts = load_prompts()
    assert len(prompts) >= 8
    assert {"codegen", "edit", "summarize", "chat"} <= {p.category for p in prompts}
    edit = load_prompts(categories=["edit"])
    assert edit and all(p.category == "edit" for p in edit)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "category": "c"}\n', "needs non-empty string fields"),
        ("not json\n", "not JSON"),
        ('{"id": "a", "category": "c", "prompt": "x"}\n{"id": "a", "category": "c", "prompt": "y"}\n', "duplicate"),
        ("\n", "holds no prompt"),
    ],
)
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(SpecdecError, match=message):
        load_prompts(path)


def test_unknown_category(tmp_path):
    with pytest.raises(SpecdecError, match="no prompt of category nope"):
        load_prompts(_prompt_file(tmp_path), ["nope"])


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs",
    [
        {"methods": ("warp",)},
        {"methods": ()},
        {"methods": ("none", "none")},
        {"repeats": 0},
        {"max_new_tokens": 0},
        {"threads": 0},
        {"dtype": "int8"},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(SpecdecError):
        BenchConfig(target="t", **kwargs)


# --------------------------------------------------------------------------- arithmetic
def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) is None


def test_geometric_mean():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([1.0, None, 4.0]) == pytest.approx(2.0)
    assert geometric_mean([]) is None


def test_make_row_median_speedup_and_divergence():
    prompt = BenchPrompt("p", "edit", "x")
    base = RunResult([1, 2, 3, 4], 2.0)
    runs = [RunResult([1, 2, 9, 4], 1.0, 2.5, 0.5), RunResult([1, 2, 9, 4], 3.0), RunResult([1, 2, 9, 4], 0.5)]
    row = make_row(prompt, "specdec-x", runs, base, baseline_tps=2.0)
    assert row.seconds == 1.0  # median of 1.0, 3.0, 0.5
    assert row.new_tokens == 4 and row.tokens_per_second == pytest.approx(4.0)
    assert row.speedup == pytest.approx(2.0)
    assert row.identical is False and row.first_divergence == 2
    assert row.mean_accepted_length == 2.5 and row.acceptance_rate == 0.5
    same = make_row(prompt, "specdec-y", [RunResult([1, 2, 3, 4], 4.0)], base, baseline_tps=2.0)
    assert same.identical is True and same.first_divergence is None and same.speedup == pytest.approx(0.5)


def _report() -> BenchReport:
    rows = [
        _row("e1", "edit", BASELINE, 1.0),
        _row("e1", "edit", "hf-assisted", 2.0),
        _row("e1", "edit", "specdec-draft", 4.0),
        _row("e2", "edit", BASELINE, 1.0),
        _row("e2", "edit", "hf-assisted", 2.0),
        _row("e2", "edit", "specdec-draft", 1.0),
        _row("c1", "chat", BASELINE, 1.0),
        _row("c1", "chat", "hf-assisted", 1.0),
        _row("c1", "chat", "specdec-draft", 1.0),
    ]
    rows[5].identical, rows[5].first_divergence = False, 7
    for row in rows:  # tokens/s consistent with the speedups, baseline 10 tok/s
        row.tokens_per_second = 10.0 * row.speedup
    machine = {"cpu": "test cpu", "threads": 2, "torch": "t", "transformers": "t", "device": "cpu"}
    config = {"target": "tiny", "draft": "tinier", "dtype": "float32", "max_new_tokens": 8}
    return BenchReport(machine, config, rows, skipped={"medusa": "needs heads"})


def test_report_geomeans_and_relative():
    report = _report()
    assert report.geomean_speedup("specdec-draft", "edit") == pytest.approx(2.0)
    assert report.geomean_speedup("specdec-draft") == pytest.approx(4 ** (1 / 3))
    assert report.geomean_speedup("hf-assisted", "chat") == pytest.approx(1.0)
    # specdec-draft over hf-assisted: 4/2, 1/2, 1/1
    assert report.relative("specdec-draft", "hf-assisted") == pytest.approx(1.0)


def test_report_json_shape_and_roundtrip(tmp_path):
    report = _report()
    path = tmp_path / "out" / "bench.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert list(data) == ["machine", "config", "rows"]
    assert set(data["machine"]) == {"cpu", "threads", "torch", "transformers", "device"}
    assert set(data["config"]) == {"target", "draft", "dtype", "max_new_tokens"}
    assert all(list(row) == ROW_KEYS for row in data["rows"])
    again = BenchReport.from_dict(data)
    assert again.geomean_speedup("specdec-draft") == pytest.approx(report.geomean_speedup("specdec-draft"))


def test_markdown_table():
    text = _report().to_markdown()
    assert "| prompt | category | hf-greedy tok/s | hf-assisted | specdec-draft |" in text
    assert "| **edit** | geomean | 10.00 | **2.00×** | **2.00×** |" in text
    assert "| **all** | geomean |" in text
    assert "1.00× †(7)" in text  # the divergent row is marked
    assert "`specdec-draft` / `hf-assisted`: 1.00×" in text
    assert "skipped `specdec-medusa`: needs heads" in text


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    _report().plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtraError, match=r"specdec\[plot\]"):
        _report().plot(tmp_path / "plot.png")


# --------------------------------------------------------------------------- the harness on a tiny model
def test_bench_rows_on_tiny_model(tiny, tmp_path):
    model, tok = tiny
    draft = _model(seed=1)
    config = BenchConfig(
        target="tiny",
        draft="tiny-draft",
        methods=("none", "draft", "prompt_lookup", "medusa"),
        max_new_tokens=10,
        dtype="float32",
        repeats=2,
        warmup_tokens=2,
    )
    events = []
    bench = Bench(model, tok, config, draft=draft, draft_tokenizer=tok)
    assert "medusa" in bench.skipped  # no heads: reported as skipped, not a crash
    report = bench.run(load_prompts(_prompt_file(tmp_path)), on_event=events.append)
    runners = [
        BASELINE,
        "hf-static",
        "hf-assisted",
        "hf-prompt-lookup",
        "specdec-none",
        "specdec-draft",
        "specdec-prompt_lookup",
    ]
    assert report.methods == runners
    assert len(report.rows) == 3 * len(runners)
    assert events[0].kind == "start" and events[0].total == len(runners) * (3 * 2 + 1)
    assert sum(e.kind == "run" for e in events) == len(runners) * 3 * 2
    for row in report.rows:
        assert row.new_tokens >= 1 and row.seconds > 0
        assert row.tokens_per_second == pytest.approx(row.new_tokens / row.seconds)
        if row.method == BASELINE:
            assert row.speedup == 1.0 and row.identical
        else:
            base = next(r for r in report.rows if r.prompt_id == row.prompt_id and r.method == BASELINE)
            assert row.speedup == pytest.approx(row.tokens_per_second / base.tokens_per_second)
        if row.method.startswith("specdec-") or row.method == "hf-static":
            assert row.identical, f"{row.method} on {row.prompt_id} differs from greedy at {row.first_divergence}"
        if row.method.startswith("specdec-"):
            assert row.mean_accepted_length is not None and row.mean_accepted_length >= 1.0
        if row.method == "specdec-none":
            assert row.mean_accepted_length == 1.0 and row.acceptance_rate is None
    assert report.machine["device"] == "cpu" and report.config["draft"] == "tiny-draft"
    assert report.config["static_cache"] is False  # the CPU default
    assert "load average" in report.to_markdown() or report.load is None
    assert math.isfinite(report.geomean_speedup("specdec-none"))


def test_bench_without_draft_skips_assisted(tiny, tmp_path):
    model, tok = tiny
    config = BenchConfig(target="tiny", methods=("none", "draft"), max_new_tokens=4, dtype="float32", warmup_tokens=0)
    bench = Bench(model, tok, config)
    assert "hf-assisted" not in bench.runners and "draft" in bench.skipped
    report = bench.run(load_prompts(_prompt_file(tmp_path), ["chat"]))
    assert report.methods == [BASELINE, "hf-static", "hf-prompt-lookup", "specdec-none"]
    # named on the command line (strict), a method that cannot run is an error before anything loads, with the
    # bench's own flags in the hint
    for method, flag in (("draft", "--draft"), ("medusa", "--medusa-heads")):
        with pytest.raises(SpecdecError, match=f"method '{method}' needs") as info:
            BenchConfig(target="no-such-model", methods=("none", method), strict=True)
        assert flag in info.value.hint and "--methods" in info.value.hint


def test_bench_refuses_a_draft_of_another_vocabulary(tiny):
    """A draft whose embedding cannot read the target's tokens: one clear error before any row runs (transformers'
    assisted generation, the hf-assisted row, would fail inside generate)."""
    model, tok = tiny
    small = tiny_model("llama", vocab=len(WORDS) // 2, device="cpu")
    with pytest.raises(VocabularyMismatchError):
        Bench(model, tok, BenchConfig(target="tiny", draft="small", methods=("none",)), draft=small)


# --------------------------------------------------------------------------- the CLI on a saved tiny model
def test_cli_bench(tiny, tmp_path):
    folder = _saved(tiny, tmp_path)
    out = tmp_path / "runs"
    args = _bench_args(folder, tmp_path, "--methods", "none,prompt_lookup", "--device", "cpu")
    args += ["--json", str(out / "b.json"), "--markdown", str(out / "b.md")]
    if _has_matplotlib():
        args += ["--plot", str(out / "b.png")]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "b.json").read_text())
    assert [r["method"] for r in data["rows"]][:5] == [
        BASELINE,
        "hf-static",
        "hf-prompt-lookup",
        "specdec-none",
        "specdec-prompt_lookup",
    ]
    assert {r["prompt_id"] for r in data["rows"]} == {"copy-a", "copy-b"}
    assert data["config"]["dtype"] == "float32" and data["machine"]["threads"] == 1
    assert data["machine"]["device"] == "cpu"
    assert all(r["identical"] for r in data["rows"])
    assert "| **all** | geomean |" in (out / "b.md").read_text()
    assert "| **all** | geomean |" in result.output
    if _has_matplotlib():
        assert (out / "b.png").stat().st_size > 0


def test_cli_bench_unknown_method():
    from specdec.cli import main

    result = CliRunner().invoke(main, ["bench", "--target", "x", "--methods", "none,warp"])
    assert result.exit_code == 1 and "unknown method(s): warp" in result.output


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_cli_bench_refuses_an_output_it_cannot_write_before_the_run(tmp_path, option):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    result = _invoke(["bench", "--target", "no-such-model", option, str(in_the_way / "runs" / "b.json")])
    assert result.exit_code == 1 and "a-file is a file" in result.output, result.output  # before loading the model


def _bench_args(folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    """``bench`` of the model in ``folder`` on the "edit" prompts: 6 new tokens, float32, one thread, no warm-up."""
    return [
        "bench",
        "--target",
        str(folder),
        "--prompts",
        str(_prompt_file(tmp_path)),
        "--category",
        "edit",
        "--max-new-tokens",
        "6",
        "--dtype",
        "float32",
        "--threads",
        "1",
        "--warmup",
        "0",
        *extra,
    ]


def _invoke(args: list[str]):
    """The CLI run with ``args``; its --threads sets torch's thread count for the whole process, so it is put back."""
    from specdec.cli import main

    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)


def _saved(tiny, tmp_path: Path) -> Path:
    """The tiny model and tokenizer saved as a model folder, for the CLI."""
    model, tok = tiny
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_bench_with_profile(tiny, tmp_path):
    """--profile fills the specdec rows' lookahead settings; every row stays identical in float32."""
    folder = _saved(tiny, tmp_path)
    out = tmp_path / "b.json"
    result = _invoke(
        _bench_args(folder, tmp_path, "--methods", "none,lookahead", "--profile", "cpu", "--json", str(out))
    )
    assert result.exit_code == 0, result.output
    assert "profile cpu" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"specdec-none", "specdec-lookahead"}
    assert all(r["identical"] for r in rows)


def _saved_heads(tiny, tmp_path: Path, tree: list[list[int]]) -> Path:
    """Untrained Medusa heads for the tiny model, saved with a recommended tree."""
    from specdec.medusa.heads import MedusaHeads

    model, _ = tiny
    heads = MedusaHeads.init(model, num_heads=2)
    heads.config.tree = tree
    heads.config.head_accuracy = [[0.5 / (r + 1) for r in range(10)], [0.3 / (r + 1) for r in range(10)]]
    folder = tmp_path / "heads"
    heads.save(folder)
    return folder


def test_cli_bench_medusa_heads_and_profile_tree_size(tiny, tmp_path, monkeypatch):
    """--medusa-heads enables specdec-medusa (added to the default methods); --profile caps its tree."""
    import specdec.proposers.medusa as medusa_proposer
    from specdec.profiles import load_profiles

    trees: list[int] = []
    original = medusa_proposer.MedusaProposer.__init__

    def spy(self, heads, tree, *args, **kwargs):
        trees.append(len(tree))
        original(self, heads, tree, *args, **kwargs)

    monkeypatch.setattr(medusa_proposer.MedusaProposer, "__init__", spy)
    folder = _saved(tiny, tmp_path)
    big_tree = [[i] for i in range(10)] + [[0, j] for j in range(10)] + [[1, 0]]
    heads = _saved_heads(tiny, tmp_path, big_tree)
    cpu_tree_size = next(p for p in load_profiles() if p.name == "cpu").medusa.tree_size
    assert cpu_tree_size < len(big_tree)
    out = tmp_path / "b.json"
    common = _bench_args(folder, tmp_path, "--medusa-heads", str(heads))
    plain = _invoke(common + ["--methods", "none,medusa", "--json", str(out)])
    assert plain.exit_code == 0, plain.output
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {
        BASELINE,
        "hf-static",
        "hf-prompt-lookup",
        "specdec-none",
        "specdec-medusa",
    }
    assert all(r["identical"] for r in rows)  # greedy Medusa is lossless
    assert all(r["mean_accepted_length"] >= 1.0 for r in rows if r["method"] == "specdec-medusa")
    assert trees == [len(big_tree)]  # no profile: the tree stored with the heads
    profiled = _invoke(common + ["--profile", "cpu", "--json", str(out)])
    assert profiled.exit_code == 0, profiled.output
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert "specdec-medusa" in methods and "specdec-auto" in methods  # medusa joins the default methods
    assert trees[1:] == [cpu_tree_size]  # the profile's tree size reached the proposer
    assert all(r["identical"] for r in rows if r["method"].startswith("specdec-"))


def test_bench_gives_heads_to_the_medusa_row_only(tiny, tmp_path):
    model, tok = tiny
    heads = _saved_heads(tiny, tmp_path, [[0], [1], [0, 0]])
    config = BenchConfig(
        target="tiny",
        methods=("auto", "medusa"),
        max_new_tokens=4,
        dtype="float32",
        warmup_tokens=0,
        medusa_heads=str(heads),
    )
    bench = Bench(model, tok, config)
    assert not bench.skipped and {"specdec-auto", "specdec-medusa"} <= set(bench.runners)
    report = bench.run(load_prompts(_prompt_file(tmp_path), ["chat"]))
    assert all(r.identical for r in report.rows)


def test_cli_generate_typical_acceptance(tiny, tmp_path):
    """generate --typical-acceptance (lossy, opt-in) reaches the Medusa proposer; its knobs alone are refused."""
    from specdec.cli import main

    folder = _saved(tiny, tmp_path)
    heads = _saved_heads(tiny, tmp_path, [[0], [1], [0, 0]])
    base = [
        "generate",
        " ".join(WORDS[:8]),
        "--target",
        str(folder),
        "--method",
        "medusa",
        "--medusa-heads",
        str(heads),
        "--dtype",
        "float32",
        "--max-new-tokens",
        "8",
        "--raw",
        "--json",
    ]
    sampled = base + ["--temperature", "0.8", "--seed", "3", "--typical-acceptance", "--posterior-threshold", "0.05"]
    first = CliRunner().invoke(main, sampled)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, sampled)
    assert json.loads(first.output)["token_ids"] == json.loads(again.output)["token_ids"]  # seeded
    refused = CliRunner().invoke(main, base + ["--posterior-alpha", "0.2"])
    assert refused.exit_code == 1 and "only apply with typical acceptance" in refused.output


def test_bench_records_the_static_path(tiny, tmp_path):
    model, tok = tiny
    config = BenchConfig(
        target="tiny",
        methods=("none", "prompt_lookup"),
        max_new_tokens=8,
        dtype="float32",
        warmup_tokens=0,
        static_cache=True,
    )
    report = Bench(model, tok, config).run(load_prompts(_prompt_file(tmp_path))[:1])
    assert report.config["static_cache"] is True
    assert all(row.identical for row in report.rows)
