"""Shared pieces of the CLI: error reporting, quiet library output, model options."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click

from ..errors import ForeignOptionsError, SpecdecError
from ..models import DEFAULT_MODEL
from ..proposers import METHODS, LookaheadOptions
from .interrupt import exit_interrupted


def quiet_libraries() -> None:
    """Hide transformers' progress bars and advisory log lines from CLI output (Python warnings stay visible)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always importable with specdec
        pass


REDELIVERY_SECONDS = 0.01
"""How soon a Ctrl-C that Python swallowed is raised again (see :func:`interrupts_kept`)."""


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Within the block a Ctrl-C is never lost.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when the signal comes; when that is a
    ``__del__`` or a weakref callback (the tokenizer libraries run many while a model loads) Python prints
    "Exception ignored" and goes on, so the load would finish and the command would run as if no key had been
    pressed. Here such a swallowed interrupt is raised again :data:`REDELIVERY_SECONDS` later (a SIGALRM), in
    ordinary code, and nothing is printed for it. Main thread on a POSIX system only; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, REDELIVERY_SECONDS)
        else:
            previous_hook(unraisable)

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous_alarm = signal.signal(signal.SIGALRM, raise_interrupt)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        sys.unraisablehook = previous_hook


def echo_error(error: SpecdecError) -> None:
    """``error: ...`` and, when there is one, ``  hint: ...`` on stderr."""
    click.echo(f"error: {error.message}", err=True)
    if error.hint:
        click.echo(f"  hint: {error.hint}", err=True)


def report_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`SpecdecError` into a message and exit code 1, without a traceback; Ctrl-C before the
    command handles it (while a model loads) into one line and :func:`exit_interrupted`. No Ctrl-C is lost
    (:func:`interrupts_kept`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with interrupts_kept():
                return func(*args, **kwargs)
        except SpecdecError as e:
            echo_error(e)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            exit_interrupted()

    return wrapper


def target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--target/--draft/--profile shared by generate and serve (read by :func:`load_generator`)."""
    options = [
        click.option(
            "--target",
            "-t",
            default=None,
            help=f"Packaged model name, local folder, .gguf file or hub id [default: {DEFAULT_MODEL}, or with "
            "--profile the profile's choice].",
        ),
        click.option("--draft", "-d", default=None, help="Draft model (same tokenizer family as the target)."),
        click.option(
            "--profile",
            default=None,
            metavar="auto|NAME|FILE.yaml",
            help="Hardware profile (a name or your own profile file): fills method, draft, quantization and their "
            "options not given "
            "(see `specdec-local detect`, `specdec-local profiles list`).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


compile_steps_option = click.option(
    "--compile-steps",
    is_flag=True,
    default=False,
    help="Compile the static cache's steps with torch.compile before they are captured: each layer's small "
    "kernels fused into a few (for GPUs; the first steps wait for the compile). Turns the static cache on.",
)
"""--compile-steps, for every command that loads a generator (``SpeculativeGenerator(compile_steps=...)``)."""


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--target/--draft/--method/... shared by generate and bench."""
    options = [
        click.option(
            "--method",
            "-m",
            type=click.Choice(METHODS),
            default="auto",
            show_default=True,
            help="Proposer: none (plain decoding), draft, prompt_lookup, lookahead, medusa, auto.",
        ),
        click.option(
            "--num-speculative-tokens",
            "-k",
            type=click.IntRange(min=0),
            default=None,
            help="Fixed candidates per step (default: adaptive).",
        ),
        click.option(
            "--window-size",
            type=click.IntRange(min=1),
            default=None,
            help=f"Lookahead window W [default: {LookaheadOptions.window_size}, or the profile's].",
        ),
        click.option(
            "--ngram-size",
            type=click.IntRange(min=2),
            default=None,
            help=f"Lookahead n-gram size N [default: {LookaheadOptions.ngram_size}, or the profile's].",
        ),
        click.option(
            "--guess-size",
            type=click.IntRange(min=1),
            default=None,
            help=f"Lookahead candidates per step G [default: {LookaheadOptions.guess_size}, or the profile's].",
        ),
        click.option("--medusa-heads", type=click.Path(), default=None, help="Folder of trained Medusa heads."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="auto = bfloat16 where the device computes it natively (on x86 CPUs: avx512_bf16 or AMX), "
            "else float32 on a CPU and float16 on a GPU.",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, mps..."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch."),
        click.option(
            "--static-cache/--no-static-cache",
            default=None,
            help="Preallocated caches at fixed row buckets, as CUDA graphs on CUDA "
            "[default: on for CUDA, off elsewhere].",
        ),
        compile_steps_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_options(max_new_tokens: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--max-new-tokens/--temperature/--top-k/--top-p/--repetition-penalty/--seed/--stop, shared by generate
    and chat (read by :func:`sampling_arguments`)."""
    options = [
        click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=max_new_tokens, show_default=True),
        click.option(
            "--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy."
        ),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True),
        click.option(
            "--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True
        ),
        click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible runs)."),
        click.option("--stop", multiple=True, help="Stop string (repeatable); the text is cut before it."),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


prefix_cache_option = click.option(
    "--prefix-cache/--no-prefix-cache",
    default=True,
    show_default=True,
    help="Keep the last reply's KV cache and compute only what the next prompt adds (a chat's history is not "
    "prefilled again). Exact in float32; in bfloat16 a reply may then differ in rounding from a cold one.",
)
"""--prefix-cache/--no-prefix-cache, for the commands that serve more than one prompt (chat, serve)."""

SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")


def sampling_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of :func:`sampling_options` from ``kwargs`` into keywords for ``stream``/``generate``."""
    sampling = {name: kwargs.pop(name) for name in SAMPLING}
    sampling["stop"] = list(sampling["stop"]) or None
    return sampling


def method_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the method options of :func:`model_options` (and ``static_cache``, ``compile_steps``) into keywords for
    ``specdec.load`` (None = not given; ``specdec.load`` builds the chosen method's options object from them)."""
    names = ("window_size", "ngram_size", "guess_size", "medusa_heads", "static_cache", "compile_steps")
    return {name: kwargs.pop(name) for name in names}


def load_generator(kwargs: dict[str, Any], **options: Any):
    """Pop the options of :func:`target_options` and :func:`model_options` from ``kwargs`` and load the
    generator with ``specdec.load`` (``options``: more method options); print the profile's notes."""
    import specdec

    options.update(method_options(kwargs))
    if "prefix_cache" in kwargs:
        options["prefix_cache"] = kwargs.pop("prefix_cache")
    try:
        gen = specdec.load(
            kwargs.pop("target"),
            draft=kwargs.pop("draft"),
            method=kwargs.pop("method"),
            dtype=kwargs.pop("dtype"),
            device=kwargs.pop("device"),
            num_speculative_tokens=kwargs.pop("num_speculative_tokens"),
            threads=kwargs.pop("threads"),
            profile=kwargs.pop("profile"),
            **options,
        )
    except ForeignOptionsError as e:  # named as the command line names them
        flags = {f"--{name.replace('_', '-')}": methods for name, methods in e.owners.items()}
        methods = sorted({m for ms in flags.values() for m in ms})
        raise SpecdecError(
            f"{', '.join(flags)} {'is an option' if len(flags) == 1 else 'are options'} of "
            f"{' and '.join(methods) or 'no method'}, and the method is {e.method!r}",
            f"drop {', '.join(flags)}" + (f", or use --method {methods[0]}" if len(methods) == 1 else ""),
        ) from None
    for note in getattr(gen, "profile_notes", ()):
        click.echo(f"[{note}]", err=True)
    return gen
