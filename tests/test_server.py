"""``specdec-local serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client.

One server (smollm2-135m, float32, prompt lookup, one thread) is shared by the
module; ``specdec-local generate --json`` runs beside it while it starts, as
the reference for the greedy answer. The last test stops the server with
SIGTERM in the middle of a stream.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MODEL = "smollm2-135m"
KEY = "test-key"
MAX_QUEUE = 15  # 16 concurrent clients fill it exactly: one generating, 15 waiting
COMMON = ["--target", MODEL, "--dtype", "float32", "--method", "prompt_lookup", "--threads", "1"]
MESSAGE = "Write a haiku about rivers."
GREEDY_TOKENS = 24


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=120, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text()

    def raw(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
        """One request without the client: ``(status, decoded JSON body)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, json.loads(data)

    def health(self) -> dict:
        return self.raw("GET", "/health", key=None)[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "specdec.cli", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Start the server and the reference ``generate --json`` side by side (both load the model)."""
    from specdec import models

    if not models.is_pulled(MODEL):
        pytest.skip(f"{MODEL} is not pulled: run `specdec-local models pull {MODEL}`")
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            _cli("serve", *COMMON, "--port", str(port), "--api-key", KEY, "--max-queue", str(MAX_QUEUE)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    reference = subprocess.Popen(
        _cli("generate", MESSAGE, "--json", "-n", str(GREEDY_TOKENS), *COMMON),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    yield Server(proc, port, log_path), reference
    for p in (proc, reference):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def server(processes) -> Server:
    srv, _ = processes
    for _ in range(600):  # up to ~5 minutes on a busy machine
        if srv.proc.poll() is not None:
            pytest.fail(f"the server exited with {srv.proc.returncode}:\n{srv.log()}")
        try:
            if srv.health()["status"] == "ok":
                return srv
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server did not answer /health:\n{srv.log()}")


@pytest.fixture(scope="module")
def generated(processes) -> dict:
    """``specdec-local generate --json`` for MESSAGE (greedy)."""
    _, reference = processes
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _chat(client: openai.OpenAI, content: str = MESSAGE, **kwargs):
    kwargs.setdefault("max_tokens", GREEDY_TOKENS)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str, object]:
    """The concatenated deltas of a streamed chat completion and its last chunk."""
    chunks = list(_chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1]


# ---------------------------------------------------------------------- answers
def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    health = server.health()
    assert health["model"] == MODEL and health["max_waiting"] == MAX_QUEUE


def test_greedy_chat_equals_generate(server, generated):
    res = _chat(server.client())
    assert res.choices[0].message.content == generated["text"]
    assert res.usage.completion_tokens == len(generated["token_ids"]) == generated["stats"]["new_tokens"]
    assert res.choices[0].finish_reason == ("length" if generated["finish_reason"] in ("length", "context") else "stop")
    stats = res.model_extra["specdec"]
    assert stats["method"] == "prompt_lookup" and stats["finish_reason"] == generated["finish_reason"]
    assert stats["mean_accepted_length"] >= 1 and stats["tokens_per_second"] > 0


def test_a_chat_turn_reuses_the_history_and_answers_the_same(server, generated):
    """The next turn resends the history: the server keeps its KV (usage.prompt_tokens_details.cached_tokens)
    and the answer is still the greedy one; a request that shares nothing but the template is exact too."""
    client = server.client()
    first = _chat(client)
    assert first.choices[0].message.content == generated["text"]
    messages = [
        {"role": "user", "content": MESSAGE},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Say it again, shorter."},
    ]
    follow = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert follow.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert follow.usage.prompt_tokens_details.cached_tokens < follow.usage.prompt_tokens
    assert _chat(client).choices[0].message.content == generated["text"]  # back to turn one: a shorter prefix


def test_stream_concatenates_to_the_same_text(server, generated):
    text, last = _streamed(server.client())
    assert text == generated["text"]
    assert last.choices[0].finish_reason is not None
    assert last.usage.completion_tokens == generated["stats"]["new_tokens"]
    assert last.model_extra["specdec"]["method"] == "prompt_lookup"


def test_seeded_sampling_reproduces(server):
    client = server.client()
    kwargs = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10)
    first = _chat(client, **kwargs).choices[0].message.content
    assert _chat(client, **kwargs).choices[0].message.content == first
    assert _streamed(client, **kwargs)[0] == first


def test_stop_string_cuts_like_generate(server, generated):
    text = generated["text"]
    words = text.split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    expected = text[: text.find(stop)]
    client = server.client()
    res = _chat(client, stop=[stop, "a stop string that never comes"])
    assert res.choices[0].message.content == expected
    assert res.choices[0].finish_reason == "stop" and res.model_extra["specdec"]["finish_reason"] == "stop"
    assert _streamed(client, stop=stop)[0] == expected


def test_completions_endpoint(server):
    client = server.client()
    res = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    assert res.choices[0].text and res.usage.completion_tokens == 8
    streamed = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == res.choices[0].text


# ---------------------------------------------------------------------- load
def test_sixteen_concurrent_clients_two_requests_each(server):
    """16 clients at once, each sending its own prompt twice (whole, then streamed): every answer must equal
    what that prompt gets alone, asked first one at a time."""
    client = server.client()
    prompts = [f"{n}, {n}, {n}, {n}," for n in range(101, 117)]

    def complete(prompt: str, stream: bool) -> tuple[str, str]:
        res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=stream)
        if not stream:
            return res.id, res.choices[0].text
        chunks = list(res)
        return chunks[0].id, "".join(c.choices[0].text for c in chunks if c.choices)

    alone = [complete(p, stream=False)[1] for p in prompts]
    assert len(set(alone)) > 8  # the prompts get different answers, so a mix-up would show
    answers: dict[tuple[int, int], tuple[str, str]] = {}
    errors: list[BaseException] = []

    def client_run(i: int) -> None:
        try:
            for j in range(2):
                answers[i, j] = complete(prompts[i], stream=j == 1)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(16)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - start
    assert not any(t.is_alive() for t in threads), "clients still waiting after 300 s"
    assert not errors, errors
    assert len(answers) == 32 and len({rid for rid, _ in answers.values()}) == 32
    for (i, j), (_, text) in answers.items():
        assert text == alone[i], (i, j, text, alone[i])
    print(f"\n32 requests from 16 concurrent clients answered in {wall:.1f} s")


def _open_stream(server: Server, prompt: str, max_tokens: int) -> http.client.HTTPConnection:
    """Start a streamed completion and return its connection once the response headers are in."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    conn._test_response = response  # kept for reading
    return conn


def _drop(conn: http.client.HTTPConnection) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _wait_for(condition, what: str, server: Server, tries: int = 600) -> None:
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"{what}: not reached; /health says {server.health()}")


def test_queue_full_gives_429_and_dropped_clients_free_the_server(server):
    running = _open_stream(server, "1, 2, 3, 4, 5,", 2000)
    running._test_response.readline()  # its first event: it is generating
    waiting = [_open_stream(server, f"{i}, {i}, {i},", 2000) for i in range(MAX_QUEUE)]
    _wait_for(lambda: server.health()["waiting"] == MAX_QUEUE, "a full queue", server)
    with pytest.raises(openai.RateLimitError) as err:
        _chat(server.client(), max_tokens=4)
    assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
    for conn in waiting:  # the waiting clients drop, then the one generating
        _drop(conn)
    _wait_for(lambda: server.health()["waiting"] == 0, "an empty queue", server)
    _drop(running)
    _wait_for(lambda: server.health()["running"] is None, "an idle server", server)
    assert _chat(server.client(), max_tokens=4).usage.completion_tokens == 4
    dropped = [line for line in server.log().splitlines() if " 499 " in line]
    assert len(dropped) == 1 + MAX_QUEUE
    completions = [
        int(part.split("=")[1]) for line in dropped for part in line.split() if part.startswith("completion=")
    ]
    assert len(completions) == 1 and 0 < completions[0] < 2000  # only the running one had started; it stopped early


def test_a_dropped_whole_request_is_cancelled(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
    _wait_for(lambda: server.health()["running"] is not None, "a running generation", server)
    rid = server.health()["running"]
    _drop(conn)
    _wait_for(lambda: server.health()["running"] is None, "an idle server", server)
    line = next(line for line in server.log().splitlines() if rid in line)
    assert " 499 " in line
    assert 0 < int(line.split("completion=")[1].split()[0]) < 2000


# ---------------------------------------------------------------------- bad input
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    chat = "/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (b"{not json", 400, None, "invalid_json"),
        (b"[" * 5000 + b"]" * 5000, 400, None, "invalid_json"),  # nested beyond the decoder's recursion
        (json.dumps(ok)[:-1].encode() + b', "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "invalid_json"),
        (json.dumps({"model": MODEL}).encode(), 400, "messages", "missing_field"),
        (json.dumps({"messages": ok["messages"]}).encode(), 400, "model", "missing_field"),
        (json.dumps({**ok, "model": None}).encode(), 400, "model", "missing_field"),
        (json.dumps({**ok, "model": "gpt-4o"}).encode(), 404, "model", "model_not_found"),
        (json.dumps({**ok, "n": 2}).encode(), 400, "n", "unsupported_parameter"),
        (json.dumps({**ok, "logprobs": True}).encode(), 400, "logprobs", "unsupported_parameter"),
        (json.dumps({**ok, "presence_penalty": 0.5}).encode(), 400, "presence_penalty", "unsupported_parameter"),
        (
            json.dumps({**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(),
            400,
            "tools",
            "unsupported_parameter",
        ),
        (json.dumps({**ok, "max_tokens": -5}).encode(), 400, "max_tokens", "invalid_value"),
        (
            json.dumps({**ok, "messages": [{"role": "user", "content": None}]}).encode(),
            400,
            "messages[0].content",
            "invalid_value",
        ),
        (json.dumps({**ok, "max_tokens": 9000}).encode(), 400, "messages", "context_length_exceeded"),
        (
            json.dumps({**ok, "messages": [{"role": "user", "content": "hello " * 9000}]}).encode(),
            400,
            "messages",
            "context_length_exceeded",
        ),
        (b" " * (2 << 20), 413, None, "request_too_large"),
        (json.dumps({**ok, "temperature": math.inf}).encode(), 400, "temperature", "invalid_value"),
        (json.dumps(ok)[:-1].encode() + b', "top_p": NaN}', 400, "top_p", "invalid_value"),
        (json.dumps(ok)[:-1].encode() + b', "repetition_penalty": 1e999}', 400, "repetition_penalty", "invalid_value"),
    ]
    for body, status, param, code in cases:
        got, data = server.raw("POST", chat, body)
        assert got == status, (body[:80], data)
        assert set(data["error"]) == {"message", "type", "param", "code"}, data
        assert data["error"]["param"] == param and data["error"]["code"] == code, data
    # OpenAI's optional fields are nullable, and null means the default (front-ends write unset options so)
    nulls = dict.fromkeys(("top_p", "top_k", "n", "presence_penalty", "frequency_penalty", "stream", "echo"))
    got, data = server.raw("POST", chat, json.dumps({**ok, "temperature": 0, "max_tokens": 4, **nulls}).encode())
    assert got == 200 and data["choices"][0]["message"]["content"], data
    too_long = server.raw("POST", chat, cases[-5][0])[1]["error"]["message"]
    assert "8192" in too_long and "max_tokens" not in too_long  # the context is named; no max_tokens was sent
    for stream in (False, True):  # a seed torch cannot take is refused before the answer starts, streamed or not
        got, data = server.raw("POST", chat, json.dumps({**ok, "seed": 2**70, "stream": stream}).encode())
        assert got == 400 and data["error"]["param"] == "seed", data
    for prompt in ([10**7], [], [[1, 2], [3]]):  # an id beyond the vocabulary, no prompt, a batch of two
        got, data = server.raw("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": prompt}).encode())
        assert got == 400 and data["error"]["param"] == "prompt", data
    with pytest.raises(openai.AuthenticationError):
        _chat(server.client(key="wrong-key"), max_tokens=2)
    assert server.raw("GET", "/v1/models", key=None)[0] == 401
    assert server.proc.poll() is None
    assert _chat(server.client(), max_tokens=3).usage.completion_tokens == 3


def test_every_request_is_one_log_line(server):
    rid = _chat(server.client(), max_tokens=2).id
    lines = [line for line in server.log().splitlines() if rid in line]
    assert len(lines) == 1
    assert all(
        f" {field}" in lines[0]
        for field in ("200", "prompt=", "completion=2", "tok/s=", "method=prompt_lookup", "accepted=")
    )


# ---------------------------------------------------------------------- the command line
def test_network_host_needs_an_api_key():
    from specdec.cli import main

    res = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"], env={"SPECDEC_API_KEY": ""})
    assert res.exit_code == 1 and "--api-key" in res.output and "Traceback" not in res.output


def test_loopback_hosts():
    from specdec.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


# ---------------------------------------------------------------------- last: shutdown
def test_sigterm_ends_the_stream_and_exits_cleanly(server):
    conn = _open_stream(server, "1, 2, 3, 4, 5,", 2000)
    response = conn._test_response
    response.readline()  # generating
    server.proc.send_signal(signal.SIGTERM)
    rest = response.read().decode()  # the server closes the stream
    assert '"code": "shutting_down"' in rest and rest.rstrip().endswith("data: [DONE]")
    assert server.proc.wait(timeout=120) == -signal.SIGTERM
    log = server.log()
    assert log.rstrip().endswith("stopped") and "Traceback" not in log


def test_a_port_in_use_is_said_before_the_model_loads():
    import socket

    from specdec.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a target that does not exist: reaching the model load would give another error
        res = CliRunner().invoke(main, ["serve", "--port", str(port), "--target", "no-such-model"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"127.0.0.1:{port}" in res.output and "--port" in res.output
