"""``specdec-local chat``: replies equal a fresh generation over the whole conversation, the history is kept as
KV cache, it is cut to fit the context, and Ctrl-C stops a reply without ending the chat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import tiny_model_folder

import specdec
from specdec.cli import main
from specdec.history import fit_history
from specdec.errors import SpecdecError

COMMON = ["--dtype", "float32", "--method", "prompt_lookup", "--threads", "1"]


@pytest.mark.real_model
def test_each_reply_is_the_models_reply_to_the_whole_conversation(smollm2):
    model, tokenizer = smollm2
    questions = ["Name two colours.", "And one more?", "/help", "/undo", "", "/reset", "Name two colours."]
    res = CliRunner().invoke(
        main, ["chat", *COMMON, "-n", "16", "--system", "Be brief."], input="\n".join(questions) + "\n"
    )
    assert res.exit_code == 0, res.output
    cold = specdec.SpeculativeGenerator(model, tokenizer, method="none", prefix_cache=False)
    messages = [{"role": "system", "content": "Be brief."}]
    expected = []
    for question in ("Name two colours.", "And one more?"):
        messages.append({"role": "user", "content": question})
        text = cold.generate(messages, max_new_tokens=16).text
        messages.append({"role": "assistant", "content": text})
        expected.append(text)
    assert res.stdout == "".join(t + "\n" for t in [*expected, expected[0]])  # /reset: the first reply again
    stats = [line for line in res.stderr.splitlines() if "tok/s" in line]
    assert len(stats) == 3
    assert "prompt tokens kept" not in stats[0] and "prompt tokens kept" in stats[1]
    assert "/reset" in res.stderr and "[new conversation]" in res.stderr
    assert "[unknown command /undo]" in res.stderr and "unknown command /help" not in res.stderr


@pytest.mark.real_model
def test_the_oldest_exchanges_leave_to_fit_the_context(smollm2):
    model, tokenizer = smollm2
    gen = specdec.SpeculativeGenerator(model, tokenizer, method="none")
    gen.context_length = 160
    long = "word " * 30
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        messages += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "Last question?"})
    ids, budget, dropped = fit_history(gen, messages, max_new_tokens=32)
    assert dropped >= 1 and budget == 32 and len(ids) + 32 <= 160
    assert messages[0]["role"] == "system" and messages[-1]["content"] == "Last question?"
    assert len(messages) == 1 + 2 * (3 - dropped) + 1
    # a message that alone fills the context is refused, and one that leaves less room gets a shorter reply
    with pytest.raises(SpecdecError, match="fills the model's context"):
        fit_history(gen, [{"role": "user", "content": "word " * 200}], 32)
    ids, budget, _ = fit_history(gen, [{"role": "user", "content": "word " * 120}], 32)
    assert 0 < budget < 32 and len(ids) + budget == 160


@pytest.mark.real_model
@pytest.mark.real_model
def test_after_a_drop_the_next_turns_keep_the_kv_cache(smollm2):
    """Exchanges leave with headroom: the turn after one that dropped history reuses that turn's KV cache
    instead of computing the whole conversation again, and every reply is still the model's own."""
    model, tokenizer = smollm2
    gen = specdec.SpeculativeGenerator(model, tokenizer, method="prompt_lookup")
    cold = specdec.SpeculativeGenerator(model, tokenizer, method="none", prefix_cache=False)
    gen.context_length = cold.context_length = 400
    messages = [{"role": "system", "content": "Be brief."}]
    turns = []  # (exchanges dropped, prompt tokens, prompt tokens whose KV cache was kept)
    for i in range(12):
        messages.append({"role": "user", "content": f"Question {i}: " + "tell me more " * 8})
        ids, budget, dropped = fit_history(gen, messages, max_new_tokens=16)
        result = gen.generate(ids, max_new_tokens=budget)
        assert result.token_ids == cold.generate(ids, max_new_tokens=budget).token_ids
        messages.append({"role": "assistant", "content": result.text})
        turns.append((dropped, len(ids), result.stats.cached_tokens))
    drops = [i for i, (dropped, _, _) in enumerate(turns) if dropped]
    followed = [i for i in drops if i + 1 < len(turns)]
    assert followed, f"no turn dropped history and had a turn after it: {turns}"
    for i in followed:
        dropped, _, kept = turns[i + 1]
        assert not dropped and kept >= turns[i][1] - 1, f"turn {i + 1} computed the conversation again: {turns}"
    assert len(drops) <= len(turns) // 3, turns


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(smollm2):
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "chat", *COMMON, "-n", "2000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    proc.stdin.write(b"Count from 1 to 500, separated by commas.\n")
    proc.stdin.flush()
    assert proc.stdout.read(8)  # the reply is streaming
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(b"Thanks. Now say hello.\n", timeout=300)
    err = err.decode()
    assert proc.returncode == 0, err
    assert "[stopped: " in err and "Traceback" not in err
    stats = [line for line in err.splitlines() if "tok/s" in line]
    assert len(stats) == 2 and "prompt tokens kept" in stats[1]  # the stopped turn's cache was whole


@pytest.mark.real_model
def test_at_a_terminal_lines_are_read_with_line_editing_and_ctrl_d_leaves(smollm2):
    """stdin a real terminal (a pty): messages are read by ``input`` (readline), Ctrl-D at the prompt ends the
    chat with exit code 0, and the replies still go to stdout alone."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "chat", *COMMON, "-n", "8"],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    os.close(follower)
    os.write(leader, b"Name a fruit.\n")
    assert proc.stdout.readline().strip()  # the reply
    os.write(leader, b"\x04")  # Ctrl-D at the next prompt
    out, err = proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode() and "tok/s" in err.decode()


def test_a_model_without_a_chat_template_is_a_clear_error(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    res = CliRunner().invoke(main, ["chat", "--target", str(folder), "--dtype", "float32"], input="hi\n")
    assert res.exit_code == 1, res.output
    assert "no chat template" in res.stderr and "generate --raw" in res.stderr and "Traceback" not in res.output


def test_a_path_is_a_message_not_a_command():
    from specdec.cli.chat import is_command

    assert is_command("/reset") and is_command("/undo") and is_command("/help")
    assert not is_command("/usr/bin/python") and not is_command("/ what") and not is_command("/etc/hosts?")
