"""The bench's report: rows, geometric means, and their Markdown table, JSON and plot.

A :class:`BenchReport` holds one :class:`BenchRow` per (prompt, runner) as the
harness (:mod:`specdec.bench.harness`) measured it, plus the machine and
config; it renders them and reads a saved JSON back to render it again. It
runs nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError

BASELINE = "hf-greedy"
"""The runner every speedup is relative to."""


@dataclass
class BenchRow:
    """One row of the JSON report: one runner on one prompt (median over repeats)."""

    prompt_id: str
    category: str
    method: str
    new_tokens: int
    seconds: float
    tokens_per_second: float
    speedup: float | None
    mean_accepted_length: float | None
    acceptance_rate: float | None
    identical: bool | None
    first_divergence: int | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key, digits in (
            ("seconds", 4),
            ("tokens_per_second", 3),
            ("speedup", 3),
            ("mean_accepted_length", 3),
            ("acceptance_rate", 4),
        ):
            if d[key] is not None:
                d[key] = round(d[key], digits)
        return d


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (a shorter list differs where it ends); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def geometric_mean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the positive values (None and non-positive ones skipped); None if there are none."""
    logs = [math.log(v) for v in values if v is not None and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


@dataclass
class BenchReport:
    """Rows plus the machine and config they were measured with; renders JSON, Markdown and a plot."""

    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[BenchRow]
    skipped: dict[str, str] = field(default_factory=dict)
    repeats: int = 1
    load: tuple[float, float] | None = None
    """1-minute load average before and after the runs (None where unknown); not in the JSON."""

    # ---------------------------------------------------------------- queries
    @property
    def methods(self) -> list[str]:
        """Runner names in the order they ran."""
        return list(dict.fromkeys(r.method for r in self.rows))

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(r.category for r in self.rows))

    def geomean_speedup(self, method: str, category: str | None = None) -> float | None:
        """Geometric mean of ``method``'s speedups over the prompts (of ``category`` if given)."""
        return geometric_mean(
            r.speedup for r in self.rows if r.method == method and (category is None or r.category == category)
        )

    def relative(self, method: str, reference: str) -> float | None:
        """Geometric mean over prompts of tokens/s of ``method`` over that of ``reference``."""
        ref = {r.prompt_id: r.tokens_per_second for r in self.rows if r.method == reference}
        return geometric_mean(
            r.tokens_per_second / ref[r.prompt_id] for r in self.rows if r.method == method and ref.get(r.prompt_id)
        )

    # ---------------------------------------------------------------- outputs
    def to_dict(self) -> dict[str, Any]:
        """The JSON shape other tools read: ``machine``, ``config``, ``rows``."""
        return {"machine": dict(self.machine), "config": dict(self.config), "rows": [r.to_dict() for r in self.rows]}

    def write_json(self, path: str | Path) -> None:
        _write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchReport":
        """Read back what :meth:`to_dict` wrote (to re-render a table or a plot)."""
        return cls(machine=data["machine"], config=data["config"], rows=[BenchRow(**r) for r in data["rows"]])

    def to_markdown(self) -> str:
        """Speedup table (per prompt, geometric mean per category and overall), then specdec's acceptance."""
        methods = [m for m in self.methods if m != BASELINE]
        cfg, mach = self.config, self.machine
        draft = f", draft `{cfg['draft']}`" if cfg.get("draft") else ""
        lines = [
            f"Target `{cfg['target']}`{draft}, {cfg['dtype']}, {cfg['max_new_tokens']} new tokens, greedy; "
            f"{mach.get('cpu')}, {mach.get('threads')} threads, device {mach.get('device')}; "
            f"torch {mach.get('torch')}, transformers {mach.get('transformers')}; "
            f"median of {self.repeats} run(s) per prompt and method"
            + (
                f"; load average {self.load[0]:.1f} before, {self.load[1]:.1f} after, on {os.cpu_count()} cores."
                if self.load
                else "."
            ),
            "",
            f"Speedup = tokens/s over `{BASELINE}` on the same prompt in the same run "
            "(geometric means in bold). † = output differs from hf-greedy, at the token index in brackets.",
            "",
            "| prompt | category | hf-greedy tok/s | " + " | ".join(methods) + " |",
            "|---|---|---:|" + "---:|" * len(methods),
        ]
        by_key = {(r.prompt_id, r.method): r for r in self.rows}
        prompts = list(dict.fromkeys((r.prompt_id, r.category) for r in self.rows))
        for category in self.categories:
            for pid, cat in prompts:
                if cat != category:
                    continue
                base = by_key.get((pid, BASELINE))
                cells = [_speedup_cell(by_key.get((pid, m))) for m in methods]
                lines.append(
                    f"| {pid} | {cat} | {_num(base.tokens_per_second if base else None)} | " + " | ".join(cells) + " |"
                )
            base_tps = geometric_mean(
                r.tokens_per_second for r in self.rows if r.method == BASELINE and r.category == category
            )
            cells = [_bold(_times(self.geomean_speedup(m, category))) for m in methods]
            lines.append(f"| **{category}** | geomean | {_num(base_tps)} | " + " | ".join(cells) + " |")
        base_tps = geometric_mean(r.tokens_per_second for r in self.rows if r.method == BASELINE)
        cells = [_bold(_times(self.geomean_speedup(m))) for m in methods]
        lines.append(f"| **all** | geomean | {_num(base_tps)} | " + " | ".join(cells) + " |")

        spec = [m for m in methods if m.startswith("specdec-")]
        if spec:
            lines += [
                "",
                "Mean accepted length (tokens per target forward, including the bonus token) / acceptance rate:",
                "",
                "| prompt | " + " | ".join(spec) + " |",
                "|---|" + "---:|" * len(spec),
            ]
            for pid, _ in prompts:
                cells = []
                for m in spec:
                    r = by_key.get((pid, m))
                    if r is None or r.mean_accepted_length is None:
                        cells.append("–")
                    else:
                        rate = f" / {r.acceptance_rate:.0%}" if r.acceptance_rate is not None else ""
                        cells.append(f"{r.mean_accepted_length:.2f}{rate}")
                lines.append(f"| {pid} | " + " | ".join(cells) + " |")

        pairs = [
            (a, b)
            for a, b in (("specdec-draft", "hf-assisted"), ("specdec-prompt_lookup", "hf-prompt-lookup"))
            if a in methods and b in methods
        ]
        if pairs:
            lines += [""] + [
                f"- `{a}` / `{b}`: {_times(self.relative(a, b))} (geometric mean over prompts)" for a, b in pairs
            ]
        if self.skipped:
            lines += [""] + [f"- skipped `specdec-{m}`: {why}" for m, why in self.skipped.items()]
        return "\n".join(lines) + "\n"

    def write_markdown(self, path: str | Path) -> None:
        _write(path, self.to_markdown())

    def plot(self, path: str | Path) -> None:
        """Bar chart of geometric-mean speedup by method and category (PNG); needs matplotlib."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise MissingExtraError("plot", "matplotlib", "the bench plot") from None
        methods = [m for m in self.methods if m != BASELINE]
        groups = [*self.categories, "all"]
        fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(methods)) / 2.5), 4.5), dpi=120)
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            values = [self.geomean_speedup(method, None if g == "all" else g) or 0.0 for g in groups]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, values, width, label=method)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label=f"{BASELINE} = 1")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(f"speedup over {BASELINE} (geometric mean)")
        draft = f" / {self.config['draft']}" if self.config.get("draft") else ""
        ax.set_title(
            f"{self.config['target']}{draft}, {self.config['dtype']}, {self.machine.get('threads')} threads, "
            f"{self.machine.get('device')}",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, format="png")


def _write(path: str | Path, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _bold(text: str) -> str:
    return text if text == "–" else f"**{text}**"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _speedup_cell(row: BenchRow | None) -> str:
    if row is None:
        return "–"
    cell = _times(row.speedup)
    return cell if row.identical in (True, None) else f"{cell} †({row.first_divergence})"
