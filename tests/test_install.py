"""install.py against temporary folders laid out like text-generation-webui checkouts.

The webui's own Python (``installer_files/env/bin/python``) is a small fake
here: it answers the package listing with a list kept in a JSON file and
records ``-m pip`` calls instead of running pip, so install.py's real code
path (choosing the environment, the pip command lines, what uninstall
removes, a failing pip) is exercised without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "install.py"

FAKE_PYTHON = """#!{python}
import json, sys
from pathlib import Path
here = Path(__file__).resolve().parent
state = here / "state.json"
data = json.loads(state.read_text())
if sys.argv[1] == "-c":
    print(json.dumps(data["installed"]))
elif sys.argv[1:3] == ["-m", "pip"]:
    args = sys.argv[3:]
    if "--dry-run" in args:  # answer with the report pip would write
        data["dry_runs"] = data.get("dry_runs", 0) + 1
        report = Path(args[args.index("--report") + 1])
        report.write_text(json.dumps({{"install": [{{"metadata": {{"name": n, "version": v}}}}
                                                  for n, v in data["plan"].items()]}}))
        state.write_text(json.dumps(data))
        sys.exit(0)
    data["calls"].append(args)
    if data.get("fail"):
        print("ERROR: No matching distribution found for gguf>=0.10", file=sys.stderr)
        state.write_text(json.dumps(data))
        sys.exit(1)
    if args[0] == "install":
        data["installed"].update(data["plan"])
    elif args[0] == "uninstall":
        data["installed"] = {{n: v for n, v in data["installed"].items() if n not in args[2:]}}
    state.write_text(json.dumps(data))
"""


def make_webui(root: Path, user_data: bool = True, env: bool = True) -> Path:
    """A folder with the files that mark a text-generation-webui checkout."""
    (root / "modules").mkdir(parents=True)
    (root / "server.py").write_text("# server\n")
    (root / "modules" / "extensions.py").write_text("# extensions\n")
    (root / "modules" / "text_generation.py").write_text("# text generation\n")
    (root / "extensions" / "example").mkdir(parents=True)
    if user_data:
        (root / "user_data" / "extensions").mkdir(parents=True)
    if env:
        bindir = root / "installer_files" / "env" / "bin"
        bindir.mkdir(parents=True)
        python = bindir / "python"
        python.write_text(FAKE_PYTHON.format(python=sys.executable))
        python.chmod(0o755)
        (bindir / "state.json").write_text(
            json.dumps(
                {
                    "installed": {"torch": "2.3.1", "click": "8.1.7"},
                    "calls": [],
                    "plan": {"specdec": "0.1.0", "gguf": "0.17.1", "click": "8.1.7"},  # what pip would install
                }
            )
        )
    return root


def env_state(root: Path) -> dict:
    return json.loads((root / "installer_files" / "env" / "bin" / "state.json").read_text())


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSTALL), *args], capture_output=True, text=True, timeout=120)


def test_install_reinstall_uninstall_with_the_webuis_env(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui")
    target = root / "user_data" / "extensions" / "specdec"

    first = run(str(root))
    assert first.returncode == 0, first.stderr
    assert (target / "script.py").read_bytes() == (REPO / "plugin" / "specdec" / "script.py").read_bytes()
    assert (target / "requirements.txt").is_file()
    assert "installer_files" in first.stdout and "--extensions specdec" in first.stdout
    calls = env_state(root)["calls"]
    assert calls == [["install", str(REPO), "-r", str(REPO / "plugin" / "specdec" / "requirements.txt")]]

    record = json.loads((root / "user_data" / "extensions" / ".specdec-install.json").read_text())
    assert record["complete"] and record["created_folder"] and record["pip_changed"] == {}
    assert record["manifest"]["script.py"] == hashlib.sha256((target / "script.py").read_bytes()).hexdigest()

    (target / "stale.txt").write_text("the user's own file")
    (target / "requirements.txt").write_text("changed by hand\n")
    second = run(str(root))
    assert second.returncode == 0, second.stderr
    assert (target / "stale.txt").is_file(), "a file install.py did not copy is never removed"
    assert (target / "requirements.txt").read_bytes() == (REPO / "plugin" / "specdec" / "requirements.txt").read_bytes()
    # the new version replaces a file changed by hand, and the changed one is kept beside it, with a word
    assert (target / "requirements.txt.edited").read_text() == "changed by hand\n"
    assert "kept as: requirements.txt.edited" in second.stdout
    assert "Left in place (not copied by install.py): requirements.txt.edited, stale.txt" in second.stdout
    (target / "requirements.txt").write_text("changed by hand\n")
    record = json.loads((root / "user_data" / "extensions" / ".specdec-install.json").read_text())
    assert record["pip_installed"] == {"gguf": "0.17.1", "specdec": "0.1.0"}, (
        "what the first run installed, with versions"
    )

    gone = run(str(root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert sorted(p.name for p in target.iterdir()) == ["requirements.txt", "requirements.txt.edited", "stale.txt"], (
        "only unchanged copied files go; the folder stays while it holds files that are not install.py's"
    )
    assert "left in place (changed or not ours): requirements.txt, requirements.txt.edited, stale.txt" in gone.stdout
    assert not (root / "user_data" / "extensions" / ".specdec-install.json").exists()
    assert env_state(root)["calls"][-1] == ["uninstall", "-y", "gguf", "specdec"]
    assert env_state(root)["installed"] == {"torch": "2.3.1", "click": "8.1.7"}, "packages that were there before stay"
    for leftover in target.iterdir():
        leftover.unlink()
    target.rmdir()

    again = run(str(root), "--uninstall")
    assert again.returncode == 0 and "No extension" in again.stdout


def test_old_layout_and_link(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui", user_data=False)
    done = run(str(root), "--link")
    assert done.returncode == 0, done.stderr
    target = root / "extensions" / "specdec"
    assert target.is_symlink() and target.resolve() == (REPO / "plugin" / "specdec").resolve()
    assert sorted(p.parent.name for p in (root / "extensions").glob("*/script.py")) == ["specdec"], (
        "the webui finds extensions by globbing */script.py, which must follow the link"
    )
    assert env_state(root)["calls"][0][:3] == ["install", "-e", str(REPO)]
    assert run(str(root), "--link").returncode == 0, "harmless when run twice"
    assert run(str(root), "--uninstall").returncode == 0
    assert not target.exists() and not target.is_symlink()
    assert (REPO / "plugin" / "specdec" / "script.py").is_file(), "uninstalling a link leaves the source alone"


def test_a_copy_with_changed_files_is_not_switched_to_a_link(tmp_path: Path) -> None:
    """A link needs the folder gone; one holding a changed file is refused before anything changes."""
    root = make_webui(tmp_path / "webui")
    target = root / "user_data" / "extensions" / "specdec"
    assert run(str(root), "--no-pip").returncode == 0
    (target / "script.py").write_text((target / "script.py").read_text() + "# my edit\n")
    before = {rel: (target / rel).read_bytes() for rel in ("script.py", "requirements.txt")}
    record = (root / "user_data" / "extensions" / ".specdec-install.json").read_text()
    linked = run(str(root), "--no-pip", "--link")
    assert linked.returncode == 1 and "nothing was changed" in linked.stderr and "script.py" in linked.stderr
    assert {rel: (target / rel).read_bytes() for rel in before} == before
    assert (root / "user_data" / "extensions" / ".specdec-install.json").read_text() == record
    gone = run(str(root), "--no-pip", "--uninstall")
    assert gone.returncode == 0 and "left in place (changed or not ours): script.py" in gone.stdout
    assert [p.name for p in target.iterdir()] == ["script.py"]


def test_no_pip_and_the_current_python(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui", env=False)
    done = run(str(root), "--no-pip")
    assert done.returncode == 0, done.stderr
    assert "Skipping pip" in done.stdout and sys.executable in done.stdout
    assert (root / "user_data" / "extensions" / "specdec" / "script.py").is_file()
    assert run(str(root), "--uninstall", "--no-pip").returncode == 0
    assert not (root / "user_data" / "extensions" / "specdec").exists()


def test_clear_error_for_a_folder_that_is_not_a_webui(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    result = run(str(tmp_path / "elsewhere"))
    assert result.returncode == 1
    assert "not a text-generation-webui checkout" in result.stderr and "server.py" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run(str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "not a folder" in missing.stderr


def test_clear_error_when_pip_fails_and_nothing_is_copied(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui")
    state_file = root / "installer_files" / "env" / "bin" / "state.json"
    data = json.loads(state_file.read_text())
    data["fail"] = True
    state_file.write_text(json.dumps(data))
    result = run(str(root))
    assert result.returncode == 1
    assert "pip install failed" in result.stderr and "No matching distribution" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "user_data" / "extensions" / "specdec").exists()


def test_a_foreign_folder_is_left_alone(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui")
    foreign = root / "user_data" / "extensions" / "specdec"
    foreign.mkdir()
    (foreign / "script.py").write_text("print('someone else')\n")
    for args in ((str(root), "--no-pip"), (str(root), "--uninstall", "--no-pip")):
        result = run(*args)
        assert result.returncode == 1 and "not installed by install.py" in result.stderr
    assert (foreign / "script.py").read_text() == "print('someone else')\n"


@pytest.mark.skipif(os.name == "nt", reason="the fake environment is a POSIX script")
def test_help_mentions_every_option() -> None:
    result = run("--help")
    assert result.returncode == 0
    for option in ("--link", "--uninstall", "--no-pip", "--allow-upgrade", "webui_dir"):
        assert option in result.stdout


def set_plan(root: Path, **versions: str) -> None:
    state_file = root / "installer_files" / "env" / "bin" / "state.json"
    data = json.loads(state_file.read_text())
    data["plan"].update(versions)
    state_file.write_text(json.dumps(data))


def test_changing_an_installed_version_needs_allow_upgrade(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui")
    set_plan(root, torch="2.13.0")  # pip would upgrade the webui's torch
    refused = run(str(root))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "pip would change packages the webui already has: torch 2.3.1 -> 2.13.0" in refused.stderr
    assert "--allow-upgrade" in refused.stderr
    assert env_state(root)["calls"] == [] and env_state(root)["dry_runs"] == 1, "only the dry run ran"
    assert not (root / "user_data" / "extensions" / "specdec").exists()

    allowed = run(str(root), "--allow-upgrade")
    assert allowed.returncode == 0, allowed.stderr
    assert "Changed versions (recorded): torch 2.3.1 -> 2.13.0" in allowed.stdout
    record = json.loads((root / "user_data" / "extensions" / ".specdec-install.json").read_text())
    assert record["pip_changed"] == {"torch": ["2.3.1", "2.13.0"]}
    assert "torch" not in record["pip_installed"]

    gone = run(str(root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert env_state(root)["calls"][-1] == ["uninstall", "-y", "gguf", "specdec"], "a changed package is not removed"
    assert "torch stays at 2.13.0 (it was 2.3.1" in gone.stdout


def test_record_is_written_before_copying_so_a_failed_copy_can_be_undone(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui")
    target = root / "user_data" / "extensions" / "specdec"
    (target / "script.py").mkdir(parents=True)  # a folder where a file must go: the copy fails midway
    (target / "script.py" / "keep.txt").write_text("not install.py's")
    record_file = root / "user_data" / "extensions" / ".specdec-install.json"
    record_file.write_text(json.dumps({"mode": "copy", "manifest": {}, "created_folder": True}))  # an earlier install
    failed = run(str(root), "--no-pip")
    assert failed.returncode == 1 and "could not copy script.py" in failed.stderr and "Traceback" not in failed.stderr
    record = json.loads(record_file.read_text())
    assert record["complete"] is False and "script.py" in record["manifest"]
    copied = [rel for rel in record["manifest"] if (target / rel).is_file()]
    assert copied, "some files were copied before the failure"
    undone = run(str(root), "--uninstall", "--no-pip")
    assert undone.returncode == 0, undone.stderr
    assert not any((target / rel).is_file() for rel in copied)
    assert (target / "script.py" / "keep.txt").read_text() == "not install.py's"


def test_uninstall_also_takes_the_bytecode_of_copied_files(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui")
    assert run(str(root), "--no-pip").returncode == 0
    target = root / "user_data" / "extensions" / "specdec"
    (target / "__pycache__").mkdir()
    (target / "__pycache__" / "script.cpython-311.pyc").write_bytes(b"\x00")  # as the webui's import leaves it
    assert run(str(root), "--uninstall", "--no-pip").returncode == 0
    assert not target.exists()


def _toy_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (no build step), for pip to resolve against."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return path


@pytest.mark.skipif(os.name == "nt", reason="venv layout")
def test_dry_run_report_of_the_real_pip_finds_a_version_change(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_script", INSTALL)
    install_script = importlib.util.module_from_spec(spec)
    sys.modules["install_script"] = install_script  # dataclasses look their module up
    try:
        spec.loader.exec_module(install_script)
    finally:
        del sys.modules["install_script"]

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    old = _toy_wheel(wheels, "sdtoy", "1.0")
    _toy_wheel(wheels, "sdtoy", "2.0")  # the newer version pip would upgrade to
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "env")], check=True, timeout=300)
    python = tmp_path / "env" / "bin" / "python"
    offline = ["--no-index", "--find-links", str(wheels), "--disable-pip-version-check"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *offline, str(old)], check=True, timeout=300)

    webui = install_script.Webui(tmp_path, tmp_path, python, True)
    current = install_script.installed_distributions(webui)
    assert current["sdtoy"] == "1.0"
    planned = install_script.planned_installs(python, [*offline, "sdtoy==2.0"], tmp_path)
    assert planned == {"sdtoy": "2.0"}
    assert install_script.version_changes(current, planned, {"specdec"}) == {"sdtoy": ("1.0", "2.0")}
    assert install_script.installed_distributions(webui)["sdtoy"] == "1.0", "a dry run changes nothing"
