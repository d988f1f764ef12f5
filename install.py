#!/usr/bin/env python3
"""Install the specdec extension into a text-generation-webui checkout.

Usage::

    python install.py WEBUI_DIR            # copy the extension, pip install specdec
    python install.py WEBUI_DIR --link     # link the extension, editable install (for development)
    python install.py WEBUI_DIR --uninstall
    python install.py WEBUI_DIR --no-pip   # only copy/link the extension; install specdec yourself
    python install.py WEBUI_DIR --allow-upgrade  # let pip change versions already in the webui's environment

The extension goes to ``user_data/extensions/specdec`` when the checkout has
``user_data/extensions`` (current releases), else to ``extensions/specdec``.
specdec and the extension's requirements are installed into the Python the
webui runs on: its ``installer_files/env`` when present (one-click installs),
else the Python running this script. pip is first asked what it would do
(``pip install --dry-run --report``): a change to the version of a package
already there (torch, transformers...) is refused unless ``--allow-upgrade``.
What was installed is recorded in ``.specdec-install.json`` next to the
extension, with versions and a manifest (SHA-256) of the copied files; the
record is written before copying, and ``--uninstall`` removes only the
packages it installed and the files of the manifest that are unchanged (a
folder only if install.py created it and it is then empty). Running it twice
is harmless; a copied file changed by hand is replaced by the new version and
kept beside it as ``NAME.edited``, and ``--link`` over a copy holding such files
is refused before anything changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent
PLUGIN = REPO / "plugin" / "specdec"
NAME = "specdec"
RECORD = ".specdec-install.json"

_LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
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
    missing = [
        p for p in ("server.py", "modules/extensions.py", "modules/text_generation.py") if not (root / p).is_file()
    ]
    if missing:
        raise InstallError(
            f"{root} is not a text-generation-webui checkout (missing {', '.join(missing)}); "
            "give the folder that contains server.py"
        )
    user_ext = root / "user_data" / "extensions"
    extensions = user_ext if user_ext.is_dir() else root / "extensions"
    env = root / "installer_files" / "env"
    candidates = (
        [env / "python.exe", env / "bin" / "python"]
        if os.name == "nt"
        else [env / "bin" / "python", env / "bin" / "python3"]
    )
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


def canonical(name: str) -> str:
    """A distribution name as pip compares them (``Typing_Extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions(webui: Webui) -> dict[str, str]:
    """``{canonical name: version}`` of the distributions installed in the webui's Python environment."""
    found = json.loads(_run([str(webui.python), "-c", _LIST_DISTRIBUTIONS], "listing installed packages", webui.root))
    if isinstance(found, list):  # names only (an environment that reports no versions)
        return {canonical(n): "" for n in found}
    return {canonical(n): str(v) for n, v in found.items()}


def planned_installs(python: Path, pip_args: list[str], cwd: Path) -> dict[str, str]:
    """What ``pip install *pip_args`` would install, without installing: ``{canonical name: version}``.

    Uses ``pip install --dry-run --report``.
    """
    with tempfile.TemporaryDirectory(prefix="specdec-install-") as tmp:
        report_file = Path(tmp) / "report.json"
        _run(
            [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report_file), *pip_args],
            "pip install --dry-run",
            cwd,
        )
        try:
            report = json.loads(report_file.read_text())
            return {
                canonical(item["metadata"]["name"]): str(item["metadata"]["version"])
                for item in report.get("install", [])
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InstallError(
                f"could not read pip's dry-run report ({e}); is pip older than 22.2? "
                f"upgrade it with {python} -m pip install -U pip"
            ) from None


def version_changes(current: dict[str, str], planned: dict[str, str], own: set[str]) -> dict[str, tuple[str, str]]:
    """Packages already installed whose version the plan would change (those in ``own`` excepted)."""
    return {
        name: (current[name], version)
        for name, version in planned.items()
        if name in current and current[name] != version and name not in own
    }


def read_record(webui: Webui) -> dict:
    if webui.record.is_file():
        try:
            record = json.loads(webui.record.read_text())
        except (OSError, ValueError):
            return {}
        if isinstance(record.get("pip_installed"), list):  # written by an older install.py: names only
            record["pip_installed"] = {name: "" for name in record["pip_installed"]}
        return record if isinstance(record, dict) else {}
    return {}


def write_record(webui: Webui, record: dict) -> None:
    """Write the install record whole or not at all (temporary file, then ``os.replace``)."""
    tmp = webui.record.with_name(webui.record.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, webui.record)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plugin_manifest() -> dict[str, str]:
    """``{path relative to the extension folder: SHA-256}`` of the files install.py copies."""
    ignored = {"__pycache__"}
    files = {}
    for path in sorted(PLUGIN.rglob("*")):
        rel = path.relative_to(PLUGIN)
        if path.is_file() and not ignored & set(rel.parts) and path.suffix != ".pyc":
            files[rel.as_posix()] = _sha256(path)
    return files


def remove_copied(target: Path, manifest: dict[str, str], created_folder: bool) -> list[str]:
    """Remove the files of ``manifest`` under ``target`` that are unchanged; return those left in place.

    Sub-folders that become empty go; ``target`` itself only when install.py created it and it is empty.
    """
    kept = []
    for rel, digest in manifest.items():
        path = target / rel
        if path.is_file() and not path.is_symlink() and _sha256(path) == digest:
            path.unlink()
            if path.suffix == ".py":  # the bytecode Python cached for it
                for pyc in path.parent.joinpath("__pycache__").glob(f"{path.stem}.*.pyc"):
                    pyc.unlink()
        elif path.exists():
            kept.append(rel)
    caches = {target.joinpath(*Path(rel).parts[:-1], "__pycache__") for rel in manifest}
    for cache in caches:
        if cache.is_dir() and not any(cache.iterdir()):
            cache.rmdir()
    folders = {target.joinpath(*Path(rel).parts[:i]) for rel in manifest for i in range(1, len(Path(rel).parts))}
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if created_folder and target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    return kept


def _is_ours(webui: Webui) -> bool:
    """Whether the existing extension folder was put there by this script."""
    target = webui.target
    if target.is_symlink():
        return target.resolve() == PLUGIN.resolve() or bool(read_record(webui))
    return (
        bool(read_record(webui))
        or (target / "script.py").is_file()
        and "specdec" in (target / "script.py").read_text(errors="ignore")
    )


def _old_manifest(record: dict) -> tuple[dict[str, str], bool]:
    """What the recorded install copied, and whether it created the folder."""
    manifest = record.get("manifest")
    if not isinstance(manifest, dict):  # installed by an older install.py: what it copied is what it would copy now
        return plugin_manifest(), True
    return manifest, bool(record.get("created_folder", True))


def _files_under(folder: Path) -> list[str]:
    """The files under ``folder`` (relative paths), Python's bytecode caches left out."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.relative_to(folder).parts
    )


def _would_stay(webui: Webui, record: dict) -> list[str]:
    """The files that removing the extension would leave in its folder (changed or not install.py's)."""
    target = webui.target
    if target.is_symlink() or not target.is_dir():
        return []
    manifest, _ = _old_manifest(record)
    return [rel for rel in _files_under(target) if manifest.get(rel) != _sha256(target / rel)]


def _remove_extension(webui: Webui, record: dict) -> list[str]:
    """Remove what install.py put at the extension's place; return the changed files of its manifest left there."""
    target = webui.target
    if target.is_symlink():
        target.unlink()
        return []
    if not target.is_dir():
        if target.is_file():
            target.unlink()
        return []
    manifest, created = _old_manifest(record)
    return remove_copied(target, manifest, created)


def _set_aside(target: Path, changed: list[str], manifest: dict[str, str]) -> list[str]:
    """Rename the changed files that copying ``manifest`` would overwrite to ``NAME.edited`` (``NAME.edited.2``...
    when taken); return the new names."""
    kept = []
    for rel in changed:
        if rel not in manifest:
            continue
        path = target / rel
        aside, n = path.with_name(path.name + ".edited"), 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.edited.{n}")
        path.rename(aside)
        kept.append(aside.relative_to(target).as_posix())
    return kept


def _copy_plugin(target: Path, manifest: dict[str, str]) -> None:
    for rel in manifest:
        dst = target / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(PLUGIN / rel, dst)  # never into a folder of that name, unlike copy2
            shutil.copymode(PLUGIN / rel, dst)
        except OSError as e:
            raise InstallError(
                f"could not copy {rel} to {dst} ({e.strerror or e}); the install record lists what "
                "was copied so far: fix the cause and run again, or run with --uninstall"
            ) from None


def install(webui: Webui, link: bool, pip: bool, allow_upgrade: bool = False) -> None:
    """Install (or reinstall) specdec and the extension."""
    if not (PLUGIN / "script.py").is_file():
        raise InstallError(f"the extension is missing from this checkout ({PLUGIN / 'script.py'})")
    if (webui.target.exists() or webui.target.is_symlink()) and not _is_ours(webui):
        raise InstallError(f"{webui.target} exists and was not installed by install.py; move it away first")
    record = read_record(webui)
    staying = _would_stay(webui, record) if link else []
    if staying:  # a link needs the place empty: refuse before changing anything
        raise InstallError(
            f"cannot put a link at {webui.target}: the folder holds files that install.py did not copy or that "
            f"were changed ({', '.join(staying)}); nothing was changed. Move them away, or install without --link"
        )
    installed: dict[str, str] = dict(record.get("pip_installed", {}))
    changed: dict[str, list[str]] = dict(record.get("pip_changed", {}))
    if pip:
        where = "the webui's own environment" if webui.python_is_webui_env else "the current Python environment"
        print(f"Installing specdec into {where}: {webui.python}")
        before = installed_distributions(webui)
        args = ["-e", str(REPO)] if link else [str(REPO)]
        args += ["-r", str(PLUGIN / "requirements.txt")]
        changes = version_changes(before, planned_installs(webui.python, args, webui.root), {"specdec", *installed})
        if changes and not allow_upgrade:
            listed = ", ".join(f"{n} {old} -> {new}" for n, (old, new) in sorted(changes.items()))
            raise InstallError(
                f"pip would change packages the webui already has: {listed}. Nothing was changed. "
                "Run again with --allow-upgrade to accept (the old versions are recorded), or install "
                "specdec into another environment"
            )
        _run([str(webui.python), "-m", "pip", "install", *args], "pip install", webui.root)
        after = installed_distributions(webui)
        installed.update({n: v for n, v in after.items() if n not in before})
        for name in after.keys() & before.keys():
            if after[name] != before[name] and name not in installed:
                changed[name] = [changed.get(name, [before[name]])[0], after[name]]
        if changed:
            print(
                "Changed versions (recorded): " + ", ".join(f"{n} {o} -> {v}" for n, (o, v) in sorted(changed.items()))
            )
    else:
        print(
            "Skipping pip (--no-pip): install specdec into the webui's Python yourself, e.g. "
            f"{webui.python} -m pip install {REPO}"
        )
    webui.extensions.mkdir(parents=True, exist_ok=True)
    hand_edited = _remove_extension(webui, record)
    created = bool(record.get("created_folder", True)) if record else not webui.target.exists()
    manifest = {} if link else plugin_manifest()
    new_record = {
        "extension": str(webui.target),
        "mode": "link" if link else "copy",
        "python": str(webui.python),
        "pip_installed": dict(sorted(installed.items())),
        "pip_changed": dict(sorted(changed.items())),
        "created_folder": created,
        "manifest": manifest,
        "complete": False,
    }
    write_record(webui, new_record)  # before copying: an interrupted copy is still recorded, so it can be undone
    if link:
        try:
            webui.target.symlink_to(PLUGIN, target_is_directory=True)
        except OSError as e:
            raise InstallError(
                f"could not create a link at {webui.target} ({e}); run without --link to copy instead"
            ) from None
    else:
        edited = _set_aside(webui.target, hand_edited, manifest)
        _copy_plugin(webui.target, manifest)
        if edited:
            print(f"Your changed files are kept as: {', '.join(edited)} (the new version replaced them)")
    write_record(webui, {**new_record, "complete": True})
    foreign = (
        sorted(
            p.relative_to(webui.target).as_posix()
            for p in webui.target.rglob("*")
            if p.is_file() and p.relative_to(webui.target).as_posix() not in manifest
        )
        if not link
        else []
    )
    if foreign:
        print(f"Left in place (not copied by install.py): {', '.join(foreign)}")
    print(f"Installed the extension at {webui.target} ({'link to ' + str(PLUGIN) if link else 'copy'}).")
    print(
        "Enable it by starting the webui with `--extensions specdec` "
        "(or tick it in the Session tab and apply), then load a model with the Transformers loader."
    )


def uninstall(webui: Webui, pip: bool) -> None:
    """Remove the extension's files and the packages this script installed."""
    record = read_record(webui)
    if webui.target.exists() or webui.target.is_symlink():
        if not _is_ours(webui):
            raise InstallError(f"{webui.target} was not installed by install.py; leaving it alone")
        _remove_extension(webui, record)
        left = _files_under(webui.target) if webui.target.is_dir() and not webui.target.is_symlink() else []
        print(
            f"Removed {webui.target}"
            if not left
            else f"Removed the files install.py copied to {webui.target}; left in place (changed or not ours): "
            + ", ".join(left)
        )
    else:
        print(f"No extension at {webui.target}")
    packages = sorted(record.get("pip_installed", {}))
    if pip and packages:
        python = Path(record.get("python") or webui.python)
        print(f"Uninstalling {', '.join(packages)} from {python}")
        _run([str(python), "-m", "pip", "uninstall", "-y", *packages], "pip uninstall", webui.root)
    elif packages:
        print(f"Skipping pip (--no-pip); installed by install.py: {', '.join(packages)}")
    for name, (old, new) in sorted(record.get("pip_changed", {}).items()):
        print(f"{name} stays at {new} (it was {old} before install.py; `pip install {name}=={old}` restores it)")
    if webui.record.exists():
        webui.record.unlink()
    print("specdec is uninstalled.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install the specdec extension into text-generation-webui.")
    parser.add_argument("webui_dir", type=Path, help="the text-generation-webui checkout (the folder with server.py)")
    parser.add_argument(
        "--link", action="store_true", help="link the extension and install specdec editable, for development"
    )
    parser.add_argument(
        "--uninstall", action="store_true", help="remove the extension and what install.py pip-installed"
    )
    parser.add_argument(
        "--no-pip", action="store_true", help="only copy/link/remove the extension; leave Python packages alone"
    )
    parser.add_argument(
        "--allow-upgrade",
        action="store_true",
        help="let pip change the version of packages the webui's environment already has",
    )
    args = parser.parse_args(argv)
    try:
        webui = find_webui(args.webui_dir)
        if args.uninstall:
            uninstall(webui, pip=not args.no_pip)
        else:
            install(webui, link=args.link, pip=not args.no_pip, allow_upgrade=args.allow_upgrade)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
