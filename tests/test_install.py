"""install.py against temporary folders laid out like text-generation-webui checkouts.

The webui's own Python (``installer_files/env/bin/python``) is a small fake
here: it answers the package listing with a list kept in a JSON file and
records ``-m pip`` calls instead of running pip, so install.py's real code
path (choosing the environment, the pip command lines, what uninstall
removes, a failing pip) is exercised without downloading anything.
"""
from __future__ import annotations

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
    print(json.dumps(sorted(data["installed"])))
elif sys.argv[1:3] == ["-m", "pip"]:
    data["calls"].append(sys.argv[3:])
    if data.get("fail"):
        print("ERROR: No matching distribution found for gguf>=0.10", file=sys.stderr)
        state.write_text(json.dumps(data))
        sys.exit(1)
    if sys.argv[3] == "install":
        data["installed"] = sorted(set(data["installed"]) | {{"specdec", "gguf"}})
    elif sys.argv[3] == "uninstall":
        data["installed"] = sorted(set(data["installed"]) - set(sys.argv[5:]))
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
        (bindir / "state.json").write_text(json.dumps({"installed": ["torch", "click"], "calls": []}))
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

    (target / "stale.txt").write_text("left over")
    second = run(str(root))
    assert second.returncode == 0, second.stderr
    assert not (target / "stale.txt").exists(), "a reinstall replaces the extension"
    record = json.loads((root / "user_data" / "extensions" / ".specdec-install.json").read_text())
    assert record["pip_installed"] == ["gguf", "specdec"], "what the first run installed is remembered"

    gone = run(str(root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not target.exists() and not (root / "user_data" / "extensions" / ".specdec-install.json").exists()
    assert env_state(root)["calls"][-1] == ["uninstall", "-y", "gguf", "specdec"]
    assert env_state(root)["installed"] == ["click", "torch"], "packages that were there before stay"

    again = run(str(root), "--uninstall")
    assert again.returncode == 0 and "No extension" in again.stdout


def test_old_layout_and_link(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "webui", user_data=False)
    done = run(str(root), "--link")
    assert done.returncode == 0, done.stderr
    target = root / "extensions" / "specdec"
    assert target.is_symlink() and target.resolve() == (REPO / "plugin" / "specdec").resolve()
    assert sorted(p.parent.name for p in (root / "extensions").glob("*/script.py")) == ["specdec"], \
        "the webui finds extensions by globbing */script.py, which must follow the link"
    assert env_state(root)["calls"][0][:3] == ["install", "-e", str(REPO)]
    assert run(str(root), "--link").returncode == 0, "harmless when run twice"
    assert run(str(root), "--uninstall").returncode == 0
    assert not target.exists() and not target.is_symlink()
    assert (REPO / "plugin" / "specdec" / "script.py").is_file(), "uninstalling a link leaves the source alone"


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
    for option in ("--link", "--uninstall", "--no-pip", "webui_dir"):
        assert option in result.stdout
