"""``specdec-local generate``: stream a reply, then one stats line."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .common import (
    exit_interrupted,
    load_generator,
    model_options,
    quiet_libraries,
    report_errors,
    sampling_arguments,
    sampling_options,
    target_options,
)


@click.command()
@click.argument("prompt")
@target_options
@model_options
@sampling_options(max_new_tokens=128)
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap the prompt in the chat template, or not.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option(
    "--typical-acceptance",
    is_flag=True,
    help="LOSSY, Medusa only, sampling only: Medusa's typical acceptance keeps candidates the target finds "
    "likely enough instead of sampling exactly, so the text is NOT distributed as the target's "
    "(greedy stays exact). Off by default.",
)
@click.option(
    "--posterior-threshold",
    type=click.FloatRange(min=0.0, max=1.0),
    default=None,
    help="With --typical-acceptance: hard probability threshold [default: 0.09].",
)
@click.option(
    "--posterior-alpha",
    type=click.FloatRange(min=0.0),
    default=None,
    help="With --typical-acceptance: scale of the entropy threshold alpha*exp(-entropy) [default: 0.3].",
)
@report_errors
def generate(prompt: str, chat: bool, as_json: bool, **kwargs: Any) -> None:
    """Generate a reply to PROMPT with speculative decoding (lossless: same text as the target alone).

    PROMPT "-" reads the prompt from standard input (`cat notes.txt | specdec-local generate -`).

    Token for token in float32; in bfloat16/float16 a near-tie between two tokens can round the other
    way in a verify step than in a one-token step (--dtype float32 for exact comparisons). The one
    lossy option is --typical-acceptance (Medusa, sampling), opt-in.
    """
    if prompt == "-":
        prompt = sys.stdin.read()  # before loading: a closed or empty input fails fast
        if not prompt.strip():
            raise click.UsageError("PROMPT '-' reads the prompt from standard input, and it was empty")
    elif not prompt.strip():
        raise click.UsageError("PROMPT is empty: give the text to reply to (or '-' to read it from standard input)")
    quiet_libraries()
    options = {}
    typical = kwargs.pop("typical_acceptance")
    for name in ("posterior_threshold", "posterior_alpha"):
        value = kwargs.pop(name)
        if value is not None:
            options[name] = value
    if typical:
        options["typical_acceptance"] = True
    gen = load_generator(kwargs, **options)
    messages = (
        [{"role": "user", "content": prompt}] if chat and getattr(gen.tokenizer, "chat_template", None) else prompt
    )
    sampling = sampling_arguments(kwargs)
    if as_json:
        _print_json(gen, messages, sampling)
        return
    stats = None
    try:
        for event in gen.stream(messages, **sampling):
            stats = event.stats
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        stats = gen.last_stats
        if stats is not None:
            click.echo(f"[interrupted] {stats.summary()}", err=True)
        exit_interrupted()
    sys.stdout.write("\n")
    if stats is not None:
        click.echo(stats.summary(), err=True)


def _print_json(gen: Any, messages: Any, sampling: dict[str, Any]) -> None:
    """Generate and print one JSON object; Ctrl-C prints what was made so far (``finish_reason``
    ``"interrupted"``) and exits as interrupted (:func:`~specdec.cli.common.exit_interrupted`)."""
    texts: list[str] = []
    ids: list[int] = []
    finish, stats = None, None
    try:
        for event in gen.stream(messages, **sampling):
            texts.append(event.text)
            ids += event.token_ids
            finish, stats = event.finish_reason or finish, event.stats
    except KeyboardInterrupt:
        finish, stats = "interrupted", gen.last_stats
    record = {"text": "".join(texts), "token_ids": ids, "finish_reason": finish or "length"}
    click.echo(json.dumps({**record, "stats": stats.to_dict() if stats is not None else None}))
    if finish == "interrupted":
        exit_interrupted()


commands = [generate]
