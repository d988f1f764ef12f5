"""``specdec-local bench``: specdec against transformers' greedy, assisted and prompt-lookup decoding."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from ..bench.harness import DEFAULT_METHODS, BenchConfig, BenchEvent, load_average
from ..files import check_writable
from ..proposers import METHODS
from .common import compile_steps_option, quiet_libraries, report_errors

_DEFAULTS = BenchConfig(target="")  # the option defaults below come from the config's own


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    """``("a,b", "c")`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


@click.command()
@click.option("--target", "-t", required=True, help="Packaged model name, local folder, .gguf file or hub id.")
@click.option("--draft", "-d", default=None, help="Draft model: adds hf-assisted and enables specdec-draft.")
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Prompt file (.jsonl with id, category, prompt); default: the set shipped with specdec.",
)
@click.option("--category", multiple=True, help="Only prompts of this category (repeatable or comma-separated).")
@click.option(
    "--methods",
    default=None,
    help=f"Comma-separated specdec methods, of: {', '.join(METHODS)}. "
    f"[default: {','.join(DEFAULT_METHODS)}, plus medusa with --medusa-heads]",
)
@click.option(
    "--medusa-heads",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of Medusa heads trained for the target (specdec-local train-medusa): enables the specdec-medusa row.",
)
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=_DEFAULTS.max_new_tokens, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float32", "float16"]),
    default=_DEFAULTS.dtype,
    show_default=True,
    help="Of target and draft, for every runner (auto: as for generate).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=_DEFAULTS.threads, help="torch CPU threads (default: torch's)."
)
@click.option(
    "--device",
    default=_DEFAULTS.device,
    show_default=True,
    help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps...",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=_DEFAULTS.repeats,
    show_default=True,
    help="Timed runs per prompt and method; the median is reported.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=_DEFAULTS.warmup_tokens,
    show_default=True,
    help="New tokens of the untimed warm-up run of each method (0 = no warm-up).",
)
@click.option(
    "--profile",
    default=None,
    help="Hardware profile (auto, a name or a profile file): fills --draft, the draft length and lookahead W/N/G "
    "of the specdec rows. Every row keeps --dtype and unquantized weights, so all compare alike.",
)
@click.option(
    "--static-cache/--no-static-cache",
    default=None,
    help="Specdec rows on preallocated caches at fixed row buckets, as CUDA graphs on CUDA "
    "[default: on for CUDA, off elsewhere].",
)
@compile_steps_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the rows as JSON here.")
@click.option(
    "--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None, help="Write the Markdown table here."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG plot of speedup by method and category (needs specdec[plot]).",
)
@report_errors
def bench(
    target: str,
    draft: str | None,
    prompts: str | None,
    category: tuple[str, ...],
    methods: str | None,
    medusa_heads: str | None,
    max_new_tokens: int,
    dtype: str,
    threads: int | None,
    device: str,
    repeats: int,
    warmup: int,
    profile: str | None,
    static_cache: bool | None,
    compile_steps: bool,
    json_path: str | None,
    markdown_path: str | None,
    plot_path: str | None,
) -> None:
    """Benchmark specdec against transformers on a prompt set; print a Markdown table.

    Per prompt, interleaved: hf-greedy (the baseline), hf-static, hf-assisted (with --draft),
    hf-prompt-lookup, then specdec-<method> for each of --methods.
    """
    from rich.console import Console

    from ..bench.harness import run_bench

    quiet_libraries()
    console = Console(stderr=True)
    strict = methods is not None  # a method named on the command line must run; a default one may be skipped
    if methods is None:
        methods = ",".join(DEFAULT_METHODS + (("medusa",) if medusa_heads else ()))
    num_speculative_tokens, method_options = None, {}
    if profile:
        draft, num_speculative_tokens, method_options = _profile_rows(
            profile, target, draft, _split((methods,)), medusa_heads, console
        )
    config = BenchConfig(
        target=target,
        draft=draft,
        prompts=prompts,
        categories=_split(category),
        methods=_split((methods,)),
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        threads=threads,
        device=device,
        repeats=repeats,
        warmup_tokens=warmup,
        num_speculative_tokens=num_speculative_tokens,
        method_options=method_options,
        medusa_heads=medusa_heads,
        static_cache=static_cache,
        compile_steps=compile_steps,
        strict=strict,
    )
    for option, path in (("--json", json_path), ("--markdown", markdown_path), ("--plot", plot_path)):
        if path:  # fail before the long run, not after it
            check_writable(path, option)
    if plot_path:
        _require_plot()
    _warn_if_busy(console)
    progress, on_event = _progress(console)
    with progress:
        report = run_bench(config, on_event=on_event, on_status=lambda text: console.print(f"[bold]{text}[/bold]"))
    for method, why in report.skipped.items():
        console.print(f"[yellow]skipped specdec-{method}: {why}[/yellow]")
    click.echo(report.to_markdown())  # first: the run's results are on screen whatever happens to the files
    if json_path:
        report.write_json(json_path)
    if markdown_path:
        report.write_markdown(markdown_path)
    if plot_path:
        report.plot(plot_path)


def _profile_rows(
    profile: str, target: str, draft: str | None, methods: tuple[str, ...], medusa_heads: str | None, console: Any
) -> tuple[str | None, int | None, dict[str, dict[str, Any]]]:
    """The profile's draft, draft length and, per specdec method, its options (printing its notes).

    Each row gets the options of its own method; the heads go to the specdec-medusa row only, through
    ``BenchConfig.medusa_heads`` (with heads, "auto" would pick medusa too).
    """
    from ..profiles import profile_options, profile_settings

    arguments = profile_settings(profile, target, draft=draft, has_medusa_heads=medusa_heads is not None)
    for note in arguments.notes:
        console.print(f"[bold]{note}[/bold]")
    options = {m: profile_options(m, arguments.selection) for m in methods}
    return arguments.draft, arguments.num_speculative_tokens, options


def _require_plot() -> None:
    """Raise :class:`MissingExtraError` when matplotlib (``specdec[plot]``) is missing."""
    from ..errors import MissingExtraError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtraError("plot", "matplotlib", "the bench plot (--plot)") from None


def _warn_if_busy(console: Any) -> None:
    """Warn when other work loads the machine: timings would be noisy."""
    load, cores = load_average(), os.cpu_count() or 1
    if load is not None and load > cores / 2:
        console.print(
            f"[yellow]warning: load average {load:.1f} on {cores} cores: other work is running, "
            "so timings will be noisy (threads that wait for a busy core stall torch)[/yellow]"
        )


def _progress(console: Any) -> tuple[Any, Callable[[BenchEvent], None]]:
    """A progress bar and the bench's event callback that prints each run's line and advances the bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task: dict[str, Any] = {}

    def on_event(event: BenchEvent) -> None:
        if event.kind == "start":
            task["id"] = progress.add_task("bench", total=event.total)
            return
        result = event.result
        assert result is not None
        tps = len(result.token_ids) / result.seconds if result.seconds > 0 else 0.0
        what = "warm-up" if event.kind == "warmup" else f"#{event.repeat + 1}"
        progress.console.print(
            f"[dim]{event.prompt_id:<22} {event.method:<24} {what:<8} "
            f"{len(result.token_ids):>4} tok {result.seconds:7.2f} s {tps:7.2f} tok/s[/dim]"
        )
        progress.update(task["id"], advance=1, description=f"{event.prompt_id} {event.method}")

    return progress, on_event


commands = [bench]
