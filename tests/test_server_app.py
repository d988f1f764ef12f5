"""The HTTP app and ``specdec-local serve``'s options in-process, on a tiny model with a word-level tokenizer
(``t0 t1 ...``): browser access (CORS), paths and fields clients send, the listening sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import specdec  # noqa: E402
from conftest import app_served, free_port, tiny_model, tiny_model_folder  # noqa: E402
from specdec.server.app import ServerConfig, create_app  # noqa: E402

MODEL = "tiny"
PROMPT = [5, 9, 2, 7, 7, 3]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny"), tiny_model("llama", seed=0, sharpness=3.0))


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Client:
    """Plain HTTP requests to the app served by uvicorn on 127.0.0.1."""

    port: int

    def request(self, method: str, path: str, content: bytes | None = None, headers: dict | None = None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=content, headers=headers or {})
        r = conn.getresponse()
        answer = Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
        conn.close()
        return answer

    def get(self, path: str, headers: dict | None = None) -> Answer:
        return self.request("GET", path, headers=headers)

    def options(self, path: str, headers: dict | None = None) -> Answer:
        return self.request("OPTIONS", path, headers=headers)

    def post(self, path: str, json: Any = None, content: bytes | None = None, headers: dict | None = None) -> Answer:
        body = content if content is not None else _dumps(json)
        return self.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@contextlib.contextmanager
def _client(folder, **config) -> Iterator[Client]:
    gen = specdec.load(str(folder), method="prompt_lookup", dtype="float32")
    with app_served(create_app(gen, ServerConfig(model_id=MODEL, **config))) as port:
        yield Client(port)


def _complete(client: Client, **fields) -> Answer:
    return client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **fields})


def test_browser_access_only_for_the_origins_given(folder):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    with _client(folder) as client:  # the default: no page may call the API from a browser
        assert client.options("/v1/chat/completions", headers=preflight).status_code == 405
        assert "access-control-allow-origin" not in client.get("/v1/models", headers=preflight).headers
    with _client(folder, allow_origins=("http://localhost:3000",), api_key="k") as client:
        asked = dict(preflight, **{"Access-Control-Request-Headers": "authorization,content-type"})
        answer = client.options("/v1/chat/completions", headers=asked)
        assert answer.status_code == 200  # the preflight needs no key: the browser sends none with it
        assert answer.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        got = client.get("/v1/models", headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
        assert got.status_code == 200 and got.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = dict(preflight, Origin="http://evil.example")
        assert client.options("/v1/chat/completions", headers=other).status_code == 400


def test_fields_and_paths_clients_send(folder):
    with _client(folder) as client:
        assert client.get("/v1/models/").json()["data"][0]["id"] == MODEL  # a trailing slash lists the models
        # /v1/completions without max_tokens stops at OpenAI's default (16), not at the context's end
        usage = _complete(client, temperature=0).json()["usage"]
        assert usage["completion_tokens"] == 16
        # top_p 0 (OpenAI takes 0 to 1) keeps the likeliest token alone: greedy, whatever the temperature
        ids = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "top_p": 0, "temperature": 1.5, "max_tokens": 8}
        ).json()
        greedy = _complete(client, temperature=0, max_tokens=8).json()
        assert ids["choices"][0]["text"] == greedy["choices"][0]["text"]
        assert _complete(client, temperature=0, max_tokens=2, top_logprobs=0, logprobs=None).status_code == 200
        bad = _complete(client, stream="yes")  # not a boolean: not taken as true
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"


@pytest.mark.parametrize("where", ["prompt", "stop", "key"])
def test_a_lone_surrogate_is_a_clear_400(folder, where):
    """A browser that cuts text in the middle of an emoji sends half of a UTF-16 pair (``"\\ud83d"``)."""
    body = {"model": MODEL, "prompt": "t1 t2", "max_tokens": 2}
    if where == "prompt":
        body["prompt"] = "t1 \ud83d t2"
    elif where == "stop":
        body["stop"] = ["\ud800"]
    else:
        body["\udc00"] = 1
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as \ud83d, as JSON.stringify sends it
    with _client(folder) as client:
        answer = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert "surrogate" in error["message"] and error["code"] == "invalid_value"
        clean = {"model": MODEL, "prompt": "t1 t2", "max_tokens": 2}
        assert client.post("/v1/completions", json=clean).status_code == 200  # and the server goes on


def _serve(monkeypatch, *args: str):
    """``specdec-local serve ARGS`` up to the point it would serve: ``(result, config, sockets)``."""
    import specdec.server

    seen: dict = {}

    def capture(gen, config, sockets):
        seen.update(config=config, sockets=[s.getsockname() for s in sockets])
        for s in sockets:
            s.close()

    monkeypatch.setattr(specdec.server, "serve", capture)
    from specdec.cli import main

    res = CliRunner().invoke(main, ["serve", *args], env={"SPECDEC_API_KEY": None})
    return res, seen.get("config"), seen.get("sockets")


def test_serve_options(folder, monkeypatch):
    port = free_port()
    common = ["--target", str(folder), "--dtype", "float32", "--port", str(port)]
    res, config, sockets = _serve(monkeypatch, *common, "--api-key", "", "--allow-origin", "http://a.example")
    assert res.exit_code == 0, res.output
    assert config.api_key is None  # an empty key is no key: no client could send a matching header
    assert config.allow_origins == ("http://a.example",)
    assert sockets == [("127.0.0.1", port)]
    if socket.has_ipv6:
        res, config, sockets = _serve(monkeypatch, *common, "--host", "[::1]")  # as URLs write it
        if res.exit_code == 0:
            assert config.url == f"http://[::1]:{port}" and sockets[0][:2] == ("::1", port)
        else:  # a machine without IPv6 on loopback
            assert "cannot listen" in res.output or "not an address" in res.output
    res, _, _ = _serve(monkeypatch, *common, "--host", "0.0.0.0", "--api-key", "")
    assert res.exit_code == 1 and "--api-key" in res.output


def test_the_port_is_held_from_before_the_model_loads():
    """The socket listens before the model loads, so another program cannot take the port meanwhile (the
    server would otherwise say it serves and then fail)."""
    from specdec.cli.serve import listen
    from specdec.errors import SpecdecError

    sockets = listen("127.0.0.1", 0)
    port = sockets[0].getsockname()[1]
    try:
        with pytest.raises(SpecdecError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # waits in the backlog meanwhile
            pass
    finally:
        for s in sockets:
            s.close()
