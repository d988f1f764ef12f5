"""``specdec-local chat``: an interactive conversation in the terminal.

Each turn sends the whole conversation through the model's chat template; the
generator keeps the KV of what the last turn computed (prefix reuse), so only
the new message is prefilled. Replies stream to stdout, the prompt and the
stats line go to stderr, so ``chat < questions.txt > answers.txt`` works too.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from ..engine import SpeculativeGenerator
from ..errors import SpecdecError
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

Messages = list[dict[str, str]]


HEADROOM = 0.25
"""When exchanges must leave, enough leave to free this share of the context beyond the reply's budget.

A drop changes the conversation's start, so the next turn computes all of it again (on a CPU, seconds per
thousand tokens); dropping only what the next reply needs would do that at every turn from then on. With
the headroom, the turns after a drop keep their KV cache until the conversation fills it again.
"""


def fit_history(gen: SpeculativeGenerator, messages: Messages, max_new_tokens: int) -> tuple[list[int], int, int]:
    """Drop the oldest exchanges until the prompt leaves room for the reply.

    ``messages``: an optional system message, then user/assistant turns ending with the new user message;
    the oldest user/assistant pair after the system message goes first, in place. Once one must go, more
    go until :data:`HEADROOM` of the context is free beyond the reply's budget (as long as the new message
    stays). Returns the prompt ids, the reply's token budget (``max_new_tokens``, less when even the newest
    message alone leaves less room) and how many exchanges were dropped.
    """
    dropped = 0
    first = 1 if messages and messages[0]["role"] == "system" else 0
    want = max_new_tokens  # the room asked for: the reply's budget, plus the headroom once dropping
    while True:
        ids = gen.encode(messages)
        room = gen.context_length - len(ids)
        if room >= want:
            return ids, max_new_tokens, dropped
        if len(messages) - first < 3:  # only the new message is left
            if room >= 1:
                return ids, min(room, max_new_tokens), dropped
            raise SpecdecError(
                f"the message alone ({len(ids)} tokens with the template) fills the model's context of "
                f"{gen.context_length} tokens",
                "send a shorter message",
            )
        del messages[first : first + 2]
        dropped += 1
        want = max_new_tokens + int(HEADROOM * gen.context_length)


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
        if command.startswith("/") and " " not in command:
            click.echo("\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items()), err=True)
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


commands = [chat]
