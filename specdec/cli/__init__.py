"""The ``specdec-local`` command line.

Each subcommand lives in its own module of this package and exposes
``commands: list[click.Command]``; this module only assembles them.
"""

from __future__ import annotations

import importlib
import os

# transformers' GGUF loader draws a tqdm bar per model; tqdm reads this when it is first imported
os.environ.setdefault("TQDM_DISABLE", "1")

import click  # noqa: E402

# modules of this package that define subcommands, in help order
_COMMAND_MODULES = ("generate", "chat", "serve", "models", "bench", "profiles", "medusa")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specdec")
def main() -> None:
    """specdec: lossless speculative decoding for local LLMs."""


def _register() -> None:
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for command in module.commands:
            main.add_command(command)


try:
    _register()  # imports torch and transformers: seconds, in which Ctrl-C is no reason for a traceback
except KeyboardInterrupt:
    from .interrupt import exit_interrupted

    click.echo("interrupted", err=True)
    exit_interrupted()
