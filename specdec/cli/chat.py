"""``specdec-local chat``: an interactive conversation in the terminal.

Each turn sends the whole conversation through the model's chat template; the
generator keeps the KV of what the last turn computed (prefix reuse), so only
the new message is prefilled. Replies stream to stdout, the prompt and the
stats line go to stderr, so ``chat < questions.txt > answers.txt`` works too.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from ..engine import SpeculativeGenerator
from ..errors import SpecdecError
from ..history import Messages, fit_history
from .common import (
    echo_error,
    load_generator,
    model_options,
    prefix_cache_option,
    quiet_libraries,
    report_errors,
    sampling_arguments,
    sampling_options,
    target_options,
)

COMMANDS = {"/reset": "start a new conversation", "/exit": "leave (or Ctrl-D)", "/help": "this list"}


@contextlib.contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """Within the block the first Ctrl-C only sets the yielded event (the reply stops after the current step,
    so the KV cache stays whole for the next turn); a second one interrupts at once. Main thread only;
    elsewhere Ctrl-C keeps its usual meaning."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def reply(gen: SpeculativeGenerator, prompt_ids: list[int], sampling: dict[str, Any]) -> str:
    """Stream one reply to stdout and its stats line to stderr; return its text (after a Ctrl-C, the text
    shown so far)."""
    text: list[str] = []
    stream = gen.stream(prompt_ids, **sampling)
    with stop_requests() as stop:
        try:
            for event in stream:
                if event.text:
                    text.append(event.text)
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                if stop.is_set():
                    break
        except KeyboardInterrupt:
            stop.set()
        finally:
            stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if gen.last_stats is not None:
        click.echo(f"[{'stopped: ' if stop.is_set() else ''}{gen.last_stats.summary()}]", err=True)
    return "".join(text)


def read_message() -> str | None:
    """The next line the user types (None at end of input), without its newline. At a terminal it is read
    with ``input`` (line editing and history through ``readline``); the prompt goes to stderr either way."""
    click.echo("> ", nl=False, err=True)
    if sys.stdin.isatty():
        with contextlib.suppress(EOFError):
            return input()
    else:
        line = sys.stdin.readline()
        if line:
            return line.rstrip("\n")
    click.echo("", err=True)  # end of input: leave the prompt's line
    return None


@click.command()
@target_options
@model_options
@sampling_options(max_new_tokens=512)
@prefix_cache_option
@click.option("--system", default=None, help="A system message that opens the conversation.")
@report_errors
def chat(system: str | None, **kwargs: Any) -> None:
    """Chat with a model in the terminal; every reply is the target's own (lossless).

    Type a message and Enter; /reset starts over, /exit or Ctrl-D leaves. Ctrl-C stops a reply after the
    current step (what was shown stays in the conversation; a second Ctrl-C stops at once), and at the
    prompt it leaves. The conversation is kept as KV cache, so a turn computes only the new
    message; when it outgrows the model's context the oldest exchanges are dropped.
    """
    quiet_libraries()
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input typed at the prompt

    gen = load_generator(kwargs)
    sampling = sampling_arguments(kwargs)
    if not getattr(gen.tokenizer, "chat_template", None):
        raise SpecdecError(
            "this model's tokenizer has no chat template, so a conversation cannot be rendered",
            "use `specdec-local generate --raw` for plain text completion",
        )
    opening: Messages = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    click.echo(f"[chat with {gen.method} decoding; /help lists the commands]", err=True)
    while True:
        line = read_message()
        command = line.strip() if line is not None else "/exit"
        if command in ("/exit", "/quit"):
            return
        if not command:
            continue
        if command == "/reset":
            messages = list(opening)
            click.echo("[new conversation]", err=True)
            continue
        if is_command(command):
            unknown = [f"[unknown command {command}]"] if command != "/help" else []
            click.echo("\n".join(unknown + [f"  {name:<7} {what}" for name, what in COMMANDS.items()]), err=True)
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt_ids, budget, dropped = fit_history(gen, messages, sampling["max_new_tokens"])
        except SpecdecError as e:
            messages.pop()
            echo_error(e)
            continue
        if dropped:
            click.echo(f"[the {dropped} oldest exchange(s) left the conversation to fit the context]", err=True)
        messages.append({"role": "assistant", "content": reply(gen, prompt_ids, dict(sampling, max_new_tokens=budget))})


def is_command(line: str) -> bool:
    """Whether a typed line is meant as a chat command (``/reset``, or a mistyped ``/rest``): a slash and a
    word. A path such as ``/usr/bin/python`` or ``/ what`` is a message."""
    return re.fullmatch(r"/[A-Za-z]+", line) is not None


commands = [chat]
