#!/usr/bin/env python3
"""Install the specdec extension into a text-generation-webui checkout.

Usage::

    python install.py WEBUI_DIR            # copy the extension, pip install specdec
    python install.py WEBUI_DIR --link     # link the extension, editable install (for development)
    python install.py WEBUI_DIR --uninstall
    python install.py WEBUI_DIR --no-pip   # only copy/link the extension; install specdec yourself

The extension goes to ``user_data/extensions/specdec`` when the checkout has
``user_data/extensions`` (current releases), else to ``extensions/specdec``.
specdec and the extension's requirements are installed into the Python the
webui runs on: its ``installer_files/env`` when present (one-click installs),
else the Python running this script. What was installed is recorded in
``.specdec-install.json`` next to the extension, so ``--uninstall`` removes
exactly that. Running it twice is harmless.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent
PLUGIN = REPO / "plugin" / "specdec"
NAME = "specdec"
RECORD = ".specdec-install.json"

_LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted({(d.metadata['Name'] or '').lower() for d in m.distributions()} - {''})))"
)


class InstallError(Exception):
    """A problem the user can fix; printed without a traceback."""


@dataclass
class Webui:
    """Where things go in one text-generation-webui checkout."""

    root: Path
    extensions: Path  # the folder that holds extension folders
    python: Path
    python_is_webui_env: bool

    @property
    def target(self) -> Path:
        return self.extensions / NAME

    @property
    def record(self) -> Path:
        return self.extensions / RECORD


def find_webui(folder: Path) -> Webui:
    """Check that ``folder`` is a text-generation-webui checkout and locate its extensions folder and Python."""
    root = folder.expanduser().resolve()
    if not root.is_dir():
        raise InstallError(f"{root} is not a folder; give the path of your text-generation-webui checkout")
    missing = [p for p in ("server.py", "modules/extensions.py", "modules/text_generation.py") if not (root / p).is_file()]
    if missing:
        raise InstallError(
            f"{root} is not a text-generation-webui checkout (missing {', '.join(missing)}); "
            "give the folder that contains server.py"
        )
    user_ext = root / "user_data" / "extensions"
    extensions = user_ext if user_ext.is_dir() else root / "extensions"
    env = root / "installer_files" / "env"
    candidates = [env / "python.exe", env / "bin" / "python"] if os.name == "nt" else [env / "bin" / "python", env / "bin" / "python3"]
    for python in candidates:
        if python.is_file():
            return Webui(root, extensions, python, True)
    return Webui(root, extensions, Path(sys.executable), False)


def _run(cmd: list[str], what: str, cwd: Path) -> str:
    """Run ``cmd`` in ``cwd``; raise :class:`InstallError` with its output when it fails.

    ``cwd`` is the webui checkout, never this repository: Python puts the
    current folder on ``sys.path``, and this repository's ``specdec.egg-info``
    would make specdec look installed.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    except OSError as e:
        raise InstallError(f"{what} could not start ({e}): {' '.join(cmd)}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise InstallError(f"{what} failed (exit code {proc.returncode}). Command:\n  {' '.join(cmd)}\n{tail}")
    return proc.stdout


def installed_distributions(webui: Webui) -> set[str]:
    """Lower-case names of the distributions installed in the webui's Python environment."""
    return set(json.loads(_run([str(webui.python), "-c", _LIST_DISTRIBUTIONS], "listing installed packages", webui.root)))


def read_record(webui: Webui) -> dict:
    if webui.record.is_file():
        try:
            return json.loads(webui.record.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def _is_ours(webui: Webui) -> bool:
    """Whether the existing extension folder was put there by this script."""
    target = webui.target
    if target.is_symlink():
        return target.resolve() == PLUGIN.resolve() or bool(read_record(webui))
    return bool(read_record(webui)) or (target / "script.py").is_file() and "specdec" in (target / "script.py").read_text(errors="ignore")


def _remove_extension(target: Path) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)


def install(webui: Webui, link: bool, pip: bool) -> None:
    """Install (or reinstall) specdec and the extension."""
    if not (PLUGIN / "script.py").is_file():
        raise InstallError(f"the extension is missing from this checkout ({PLUGIN / 'script.py'})")
    if (webui.target.exists() or webui.target.is_symlink()) and not _is_ours(webui):
        raise InstallError(f"{webui.target} exists and was not installed by install.py; move it away first")
    record = read_record(webui)
    installed = set(record.get("pip_installed", []))
    if pip:
        where = "the webui's own environment" if webui.python_is_webui_env else "the current Python environment"
        print(f"Installing specdec into {where}: {webui.python}")
        before = installed_distributions(webui)
        cmd = [str(webui.python), "-m", "pip", "install"]
        cmd += ["-e", str(REPO)] if link else [str(REPO)]
        cmd += ["-r", str(PLUGIN / "requirements.txt")]
        _run(cmd, "pip install", webui.root)
        installed |= installed_distributions(webui) - before
    else:
        print("Skipping pip (--no-pip): install specdec into the webui's Python yourself, e.g. "
              f"{webui.python} -m pip install {REPO}")
    webui.extensions.mkdir(parents=True, exist_ok=True)
    _remove_extension(webui.target)
    if link:
        try:
            webui.target.symlink_to(PLUGIN, target_is_directory=True)
        except OSError as e:
            raise InstallError(f"could not create a link at {webui.target} ({e}); run without --link to copy instead") from None
    else:
        shutil.copytree(PLUGIN, webui.target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    webui.record.write_text(json.dumps({
        "extension": str(webui.target),
        "mode": "link" if link else "copy",
        "python": str(webui.python),
        "pip_installed": sorted(installed),
    }, indent=2) + "\n")
    print(f"Installed the extension at {webui.target} ({'link to ' + str(PLUGIN) if link else 'copy'}).")
    print("Enable it by starting the webui with `--extensions specdec` "
          "(or tick it in the Session tab and apply), then load a model with the Transformers loader.")


def uninstall(webui: Webui, pip: bool) -> None:
    """Remove the extension and the packages this script installed."""
    record = read_record(webui)
    if webui.target.exists() or webui.target.is_symlink():
        if not _is_ours(webui):
            raise InstallError(f"{webui.target} was not installed by install.py; leaving it alone")
        _remove_extension(webui.target)
        print(f"Removed {webui.target}")
    else:
        print(f"No extension at {webui.target}")
    packages = sorted(record.get("pip_installed", []))
    if pip and packages:
        python = Path(record.get("python") or webui.python)
        print(f"Uninstalling {', '.join(packages)} from {python}")
        _run([str(python), "-m", "pip", "uninstall", "-y", *packages], "pip uninstall", webui.root)
    elif packages:
        print(f"Skipping pip (--no-pip); installed by install.py: {', '.join(packages)}")
    if webui.record.exists():
        webui.record.unlink()
    print("specdec is uninstalled.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install the specdec extension into text-generation-webui.")
    parser.add_argument("webui_dir", type=Path, help="the text-generation-webui checkout (the folder with server.py)")
    parser.add_argument("--link", action="store_true", help="link the extension and install specdec editable, for development")
    parser.add_argument("--uninstall", action="store_true", help="remove the extension and what install.py pip-installed")
    parser.add_argument("--no-pip", action="store_true", help="only copy/link/remove the extension; leave Python packages alone")
    args = parser.parse_args(argv)
    try:
        webui = find_webui(args.webui_dir)
        if args.uninstall:
            uninstall(webui, pip=not args.no_pip)
        else:
            install(webui, link=args.link, pip=not args.no_pip)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
