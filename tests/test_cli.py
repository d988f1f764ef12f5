"""The CLI through click's test runner, and Ctrl-C through a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from specdec.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_commands():
    out = run("--help").output
    assert "generate" in out and "models" in out


def test_models_list():
    res = run("models", "list")
    assert res.exit_code == 0
    assert "smollm2-135m" in res.output and "qwen-coder-1.5b" in res.output and "(default)" in res.output


def test_unknown_model_is_a_message_not_a_traceback():
    res = CliRunner().invoke(main, ["generate", "hi", "--target", "no-such-model"])
    assert res.exit_code == 1
    assert "error: model 'no-such-model'" in res.output and "hint:" in res.output
    assert "Traceback" not in res.output


def test_unknown_packaged_pull():
    res = CliRunner().invoke(main, ["models", "pull", "nope"])
    assert res.exit_code == 1 and "unknown packaged model" in res.output
    assert "needs no pull" in res.output  # a folder or a .gguf file is given to --target as it is, not pulled


def test_invalid_sampling_value_is_rejected_by_the_cli():
    res = CliRunner().invoke(main, ["generate", "hi", "--temperature", "-1"])
    assert res.exit_code == 2 and "temperature" in res.output


def test_unknown_method_choice():
    res = CliRunner().invoke(main, ["generate", "hi", "--method", "telepathy"])
    assert res.exit_code == 2 and "telepathy" in res.output


@pytest.mark.real_model
def test_generate_json_on_default_model(smollm2):
    res = run(
        "generate",
        "Write a haiku about rivers.",
        "--json",
        "--max-new-tokens",
        "16",
        "--dtype",
        "float32",
        "--method",
        "prompt_lookup",
    )
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data["stats"]["new_tokens"] == len(data["token_ids"]) <= 16
    assert data["stats"]["method"] == "prompt_lookup" and data["text"]


@pytest.mark.real_model
def test_generate_streams_then_prints_stats(smollm2):
    res = CliRunner().invoke(main, ["generate", "Say hello.", "-n", "12", "--dtype", "float32"])
    assert res.exit_code == 0
    assert "tok/s" in res.output and "mean accepted length" in res.output
    # "-" reads the prompt from standard input: the same reply as the prompt given as an argument
    piped = CliRunner().invoke(main, ["generate", "-", "-n", "12", "--dtype", "float32"], input="Say hello.")
    assert piped.exit_code == 0 and piped.stdout == res.stdout, piped.output
    empty = CliRunner().invoke(main, ["generate", "-"], input="  \n")
    assert empty.exit_code == 2 and "standard input" in empty.output
    for blank in ("", "  "):  # refused before the model loads, as from standard input
        empty = CliRunner().invoke(main, ["generate", blank, "--target", "no-such-model"])
        assert empty.exit_code == 2 and "PROMPT is empty" in empty.output


INTERRUPTED = -signal.SIGINT
"""How an interrupted command ends: killed by SIGINT (a shell shows 130 and stops the script around it)."""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches the process's libraries in /proc")
def test_ctrl_c_while_the_command_imports_torch_exits_as_interrupted_without_a_traceback():
    """The first seconds of every command import torch and transformers (before its own code runs)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "generate", "hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    for _ in range(3000):  # torch's library is mapped as `import torch` begins; its Python modules take seconds
        if proc.poll() is not None or "libtorch" in maps.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED and "Traceback" not in err.decode(), err.decode()[-800:]
    assert err.decode().strip().endswith("interrupted")


@pytest.mark.real_model
def test_ctrl_c_stops_a_shell_loop_of_commands(smollm2):
    """Ctrl-C reaches the whole foreground group, the shell too; bash stops a loop only when the command died
    of SIGINT (with a plain exit code 130 it went on with the next prompt)."""
    command = f"{shlex.quote(sys.executable)} -m specdec.cli generate -n 2000 --method none --threads 1"
    loop = f'for p in one two three; do {command} "Count from 1 to 900 ($p)."; echo "after $p status $?"; done'
    proc = subprocess.Popen(
        ["bash", "-c", loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.read(8)  # the first command streams its reply
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    out, err = proc.communicate(timeout=120)
    assert b"after" not in out, (out[-300:], err[-500:])
    assert "[interrupted]" in err.decode() and proc.returncode == INTERRUPTED  # the shell stopped by it too


@pytest.mark.real_model
def test_ctrl_c_keeps_text_prints_stats_and_exits_as_interrupted(smollm2):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "specdec.cli",
            "generate",
            "Count from 1 to 500, separated by commas.",
            "-n",
            "2000",
            "--dtype",
            "float32",
            "--method",
            "none",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        # a terminal user's Ctrl-C: undo an inherited SIG_IGN (jobs started with `&` ignore SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = proc.stdout.read(8)  # wait until text is streaming
    assert first
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED
    assert "[interrupted]" in err.decode() and "tok/s" in err.decode()
    assert len(first + out) > 8


@pytest.mark.real_model
def test_ctrl_c_with_json_prints_what_was_made(smollm2):
    """--json prints nothing until the end: Ctrl-C must still print the tokens made so far and the stats."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "generate", "Count from 1 to 900, separated by commas."]
        + ["-n", "3000", "--dtype", "float32", "--method", "none", "--threads", "1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(10)  # the float32 copy loads in about 3 s; 3000 tokens take minutes
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED, err.decode()[-500:]
    record = json.loads(out)
    assert record["finish_reason"] == "interrupted" and 0 < len(record["token_ids"]) < 3000
    assert record["text"].startswith("1") and record["stats"]["new_tokens"] == len(record["token_ids"])


@pytest.mark.real_model
def test_ctrl_c_while_the_model_loads_exits_as_interrupted_without_a_traceback(smollm2, tmp_path):
    """The .gguf load (a fresh model cache, so no unpacked copy: ~16 s here) is cut by Ctrl-C at 10 s."""
    from specdec import models

    source = models.local_path("smollm2-135m")
    gguf = Path(shutil.copy2(source, tmp_path / source.name))
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "generate", "hi", "--target", str(gguf), "--dtype", "float32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, SPECDEC_MODELS=str(tmp_path / "models")),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(10)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED, err.decode()
    assert err.decode().strip().splitlines()[-1] == "interrupted" and "Traceback" not in err.decode()
    assert out == b""


class _InterruptedFinalizer:
    """An object whose ``__del__`` is running when Ctrl-C comes, as the tokenizer libraries' are during a load."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):  # the KeyboardInterrupt is raised in here, where Python only prints and ignores it
            pass


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX only")
def test_a_ctrl_c_that_lands_in_a_finalizer_is_raised_again_not_lost():
    from specdec.cli.common import interrupts_kept

    hook, started = sys.unraisablehook, time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with interrupts_kept():
            _InterruptedFinalizer()  # dropped at once: its __del__ runs here
            time.sleep(5)  # the command goes on: the interrupt must reach it
    assert time.perf_counter() - started < 4
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and sys.unraisablehook is hook
