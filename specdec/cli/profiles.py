"""``specdec-local detect`` and ``specdec-local profiles list | show | validate``."""

from __future__ import annotations

import sys

import click

from .common import report_errors


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from ..hardware import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option(
    "--vram",
    default=None,
    callback=_size,
    metavar="SIZE",
    help="Pretend to have a GPU of this size (e.g. 8GiB) and show what would be chosen.",
)
@click.option(
    "--free",
    "free",
    default=None,
    callback=_size,
    metavar="SIZE",
    help="With --vram: memory still free on it (default: all of it).",
)
@click.option("--target", "-t", default=None, help="The target you want (default: the profile's suggestion).")
@click.option(
    "--profile",
    default="auto",
    show_default=True,
    metavar="auto|NAME|FILE.yaml",
    help="Profile to apply (a name or a file).",
)
@click.option("--target-loaded", is_flag=True, help="The target is already in memory (as in the webui).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@report_errors
def detect(
    vram: int | None, free: int | None, target: str | None, profile: str, target_loaded: bool, as_json: bool
) -> None:
    """Show the detected device and the configuration specdec would choose for it."""
    from ..hardware import assumed_gpu
    from ..hardware import detect as detect_device
    from ..profiles import configure, describe

    if free is not None and vram is None:
        raise click.UsageError("--free needs --vram")
    if vram is not None and vram <= 0:
        raise click.BadParameter("a GPU of no memory holds no model; give its size, e.g. 8GiB", param_hint="'--vram'")
    if free is not None and vram is not None and free > vram:
        raise click.BadParameter(f"more free memory than the card has (--vram {vram} bytes)", param_hint="'--free'")
    device = assumed_gpu(vram, free) if vram is not None else detect_device()
    config = configure(profile, target, device=device, target_loaded=target_loaded)
    if as_json:
        click.echo(config.to_json())
        return
    click.echo("\n".join(describe(config)))
    if device.notes and vram is None:
        click.echo("probes: " + "; ".join(device.notes))


@click.group("profiles")
def profiles_group() -> None:
    """Hardware profiles: list them, show one, validate profile files."""


@profiles_group.command("list")
@report_errors
def list_profiles() -> None:
    """One line per packaged profile: name, devices it matches, description."""
    from ..hardware import format_bytes
    from ..profiles import load_profiles, profiles_dir

    for p in load_profiles():
        m = p.match
        if m.min_memory or m.max_memory:
            span = f"{format_bytes(m.min_memory)}-" + (format_bytes(m.max_memory) if m.max_memory else "")
        else:
            span = "any size"
        click.echo(f"{p.name:<10} {'/'.join(m.backends):<10} {span:<22} {p.description}")
    click.echo(f"(from {profiles_dir()})", err=True)


@profiles_group.command("show")
@click.argument("name")
@report_errors
def show_profile(name: str) -> None:
    """Print the YAML of profile NAME."""
    from ..profiles import PROFILE_SUFFIX, find_profile, load_profiles, profiles_dir

    find_profile(name, load_profiles())  # a clear error for an unknown name
    click.echo((profiles_dir() / f"{name}{PROFILE_SUFFIX}").read_text(encoding="utf-8"), nl=False)


@profiles_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate_profiles(files: tuple[str, ...]) -> None:
    """Check profile FILES against the schema; print file, field and reason of each problem."""
    from ..profiles import ProfileError, load_profile_file

    failed = 0
    for file in files:
        try:
            load_profile_file(file)
        except ProfileError as e:
            failed += 1
            for problem in e.problems:
                click.echo(str(problem), err=True)
            continue
        click.echo(f"{file}: ok")
    sys.exit(1 if failed else 0)


commands = [detect, profiles_group]
