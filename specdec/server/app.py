"""The OpenAI-compatible HTTP API over one :class:`SpeculativeGenerator` (Starlette on uvicorn).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``
and ``POST /v1/completions``. A request is checked (key, size, JSON, fields,
model name, prompt length) on the event loop, then queued for the one worker
thread (:class:`~specdec.server.worker.GenerationQueue`). Every answer
carries ``usage`` and a ``specdec`` object with the generation's statistics;
every request is logged in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import GenerationStats, SpeculativeGenerator
from ..errors import ContextLengthError, SpecdecError
from ..history import KeptCuts, fit_history, opening
from .schemas import ApiError, ChatRequest, CompletionFields, CompletionRequest, parse
from .worker import GenerationQueue, Job, Message, QueueFullError, StoppingError

log = logging.getLogger("specdec.server")

MAX_REQUEST_BYTES = 1 << 20
"""Largest request body accepted (1 MiB: far more text than any supported context holds)."""

FIT_REPLY_TOKENS = 512
"""With ``fit_context``, the room kept for a reply whose request gives no ``max_tokens`` (at most a quarter
of the context)."""

# the engine's finish reasons in OpenAI's words
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class ServerConfig:
    """What ``specdec-local serve`` passes to :func:`create_app` (defaults defined here once)."""

    model_id: str
    api_key: str | None = None
    max_queue: int = 64
    max_request_bytes: int = MAX_REQUEST_BYTES
    fit_context: bool = False  # drop a chat's oldest exchanges when it outgrows the context, instead of a 400
    url: str = ""  # where it listens, for the log
    allow_origins: tuple[str, ...] = ()  # web pages (origins) whose scripts may call the API from a browser
    created: int = field(default_factory=lambda: int(time.time()))


class PromptEncoder:
    """Renders and tokenizes prompts on the request side, off the worker thread.

    It uses the generator's own :meth:`~SpeculativeGenerator.encode` (chat
    template included) on a shallow copy of the generator that holds its own
    copy of the tokenizer, so prompts are tokenized while the worker decodes
    with the original, and never two at a time (a limiter of one thread).
    """

    def __init__(self, generator: SpeculativeGenerator) -> None:
        self._view = copy.copy(generator)
        self._view.tokenizer = copy.deepcopy(generator.tokenizer)
        self._limiter = anyio.CapacityLimiter(1)
        self.context_length = generator.context_length

    async def encode(self, prompt: str | list[int] | list[dict[str, str]]) -> list[int]:
        return await anyio.to_thread.run_sync(self._view.encode, prompt, limiter=self._limiter)

    async def fit(self, messages: list[dict[str, str]], reply_tokens: int, cut: int) -> tuple[list[int], int]:
        """Prompt ids of ``messages`` cut to fit (:func:`~specdec.history.fit_history`, in place, ``cut``
        messages first) and the reply's budget."""
        ids, budget, _ = await anyio.to_thread.run_sync(
            fit_history, self._view, messages, reply_tokens, cut, limiter=self._limiter
        )
        return ids, budget


@dataclass
class Outcome:
    """How one request ended, for its response and its log line."""

    status: int = 200
    text: str = ""
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    error: str = ""


class Api:
    """The endpoints, over a generator, its queue and the server's config."""

    def __init__(self, generator: SpeculativeGenerator, config: ServerConfig) -> None:
        self.generator = generator
        self.config = config
        self.queue = GenerationQueue(generator, config.max_queue)
        self.encoder = PromptEncoder(generator)
        self._cuts = KeptCuts()  # --fit-context: where each recent conversation was cut (messages dropped)

    # ------------------------------------------------------------------ endpoints
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_id, **self.queue.snapshot()})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        if not request.path_params["model"]:  # /v1/models/
            return await self.models(request)
        self._authorize(request)
        self._check_model(request.path_params["model"], param=None)
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, ChatRequest, "chatcmpl")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, CompletionRequest, "cmpl")

    # ------------------------------------------------------------------ one completion
    async def _complete(self, request: Request, model: type[CompletionFields], prefix: str) -> Response:
        request_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        started = time.perf_counter()
        body: CompletionFields | None = None
        try:
            self._authorize(request)
            body = parse(model, await self._read_json(request))
            self._check_model(body.model)
            prompt_ids, max_new_tokens, dropped = await self._prompt(body)
            if dropped:
                log.info("%s: the %d oldest messages were left out to fit the context", request_id, dropped)
            greedy = body.top_p == 0  # the smallest nucleus: the likeliest token alone
            sampling = dict(
                max_new_tokens=max_new_tokens,
                temperature=0.0 if greedy else body.temperature,
                top_k=body.top_k,
                top_p=1.0 if greedy else body.top_p,
                repetition_penalty=body.repetition_penalty,
                seed=body.seed,
                stop=body.stops() or None,
            )
            job = Job(request_id, prompt_ids, sampling, asyncio.get_running_loop(), dropped_messages=dropped)
            self._submit(job)
        except ApiError as e:
            self._log(request_id, body, Outcome(status=e.status, error=e.message), started)
            return error_response(e)
        chat = isinstance(body, ChatRequest)
        if body.stream:
            events = self._sse(job, body, chat, started, len(prompt_ids))
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        outcome = await self._collect(request, job, body, started, len(prompt_ids))
        if outcome is None:  # nobody to answer
            return Response(status_code=499)
        self._log(request_id, body, outcome, started, len(prompt_ids))
        if outcome.status != 200:
            return error_response(_outcome_error(outcome))
        payload = _completion(job, self.config, chat, outcome)
        return JSONResponse(payload)

    async def _prompt(self, body: CompletionFields) -> tuple[list[int], int, int]:
        """``(prompt ids [P], max_new_tokens, messages left out)``; 400 when the prompt and the answer do not
        fit the context (with ``fit_context``, only when the last message alone leaves too little room)."""
        if isinstance(body, ChatRequest):
            if not getattr(self.generator.tokenizer, "chat_template", None):
                raise ApiError(
                    400,
                    f"model {self.config.model_id!r} has no chat template",
                    param="messages",
                    code="unsupported_model",
                )
            prompt: Any = body.chat_messages()
            if self.config.fit_context:
                return await self._fitted(prompt, body.new_tokens_limit())
        else:
            prompt = body.prompt_value()
            vocab = self.generator.target.config.vocab_size
            if isinstance(prompt, list) and not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt", code="invalid_value")
        try:
            ids = await self.encoder.encode(prompt)
        except SpecdecError as e:
            raise ApiError(400, _message(e), param="messages" if isinstance(body, ChatRequest) else "prompt") from None
        context = self.encoder.context_length
        limit = body.new_tokens_limit()
        if len(ids) >= context or (limit is not None and len(ids) + limit > context):
            asked = f" plus max_tokens ({limit})" if limit is not None else ""
            fix = "Shorten the prompt or lower max_tokens." if limit is not None else "Shorten the prompt."
            if isinstance(body, ChatRequest) and not self.config.fit_context and (limit is None or limit < context):
                fix += " (A server started with --fit-context drops a chat's oldest messages instead.)"
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the prompt ({len(ids)} tokens){asked} does not fit. {fix}",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        return ids, limit if limit is not None else context - len(ids), 0

    async def _fitted(self, messages: list[dict[str, str]], limit: int | None) -> tuple[list[int], int, int]:
        """A chat cut to fit the context (``serve --fit-context``), the way ``chat`` cuts it.

        The client sends the whole conversation each turn, so the cut is kept from request to request:
        when the messages begin with what a recent cut dropped (:class:`~specdec.history.KeptCuts`), the
        same messages go first, and the prompt starts where the last one did (its KV cache is reused) until
        more must go.
        """
        context = self.encoder.context_length
        reply = limit if limit is not None else min(FIT_REPLY_TOKENS, context // 4)
        first = opening(messages)
        cut = self._cuts.find(messages[first:])  # fit_history keeps the last message whatever the cut
        original = list(messages)
        try:
            ids, budget = await self.encoder.fit(messages, reply, cut)
        except ContextLengthError as e:  # the last message alone fills the context
            raise ApiError(400, _message(e), param="messages", code="context_length_exceeded") from None
        except SpecdecError as e:
            raise ApiError(400, _message(e), param="messages") from None
        dropped = len(original) - len(messages)
        if limit is not None and budget < limit:
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the last message ({len(ids)} tokens with the template) "
                f"plus max_tokens ({limit}) does not fit. Shorten the message or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        self._cuts.remember(original[first:], dropped)
        return ids, limit if limit is not None else context - len(ids), dropped

    def _submit(self, job: Job) -> None:
        try:
            self.queue.submit(job)
        except QueueFullError:
            raise ApiError(
                429,
                f"the server is busy: {self.queue.max_waiting} requests are already waiting "
                "(generations run one at a time). Retry later.",
                type="rate_limit_exceeded",
                code="queue_full",
            ) from None
        except StoppingError:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None

    async def _collect(
        self, request: Request, job: Job, body: CompletionFields, started: float, prompt_tokens: int
    ) -> Outcome | None:
        """Wait for a whole answer; None when the client went away first (the job is then cancelled)."""
        answer = asyncio.ensure_future(_gather(job))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            gone.cancel()
            return answer.result()
        answer.cancel()
        self._abandon(job, body, started, prompt_tokens)
        return None

    async def _sse(
        self, job: Job, body: CompletionFields, chat: bool, started: float, prompt_tokens: int
    ) -> AsyncIterator[str]:
        """Server-sent events: delta chunks, a last chunk with finish_reason/usage/specdec, ``[DONE]``.

        Starlette cancels this generator when the client disconnects; the
        ``finally`` then cancels the job (within one decoding step).
        """
        text: list[str] = []
        ended = False
        try:
            if chat:
                yield _sse(_chunk(job.request_id, self.config, chat, {"role": "assistant", "content": ""}))
            while True:
                message: Message = await job.messages.get()
                if message.kind == "delta":
                    text.append(message.text)
                    yield _sse(_chunk(job.request_id, self.config, chat, message.text))
                    continue
                ended = True
                outcome = _ended(message, "".join(text))
                self._log(job.request_id, body, outcome, started, prompt_tokens)
                if outcome.status == 200:
                    last = _chunk(job.request_id, self.config, chat, None, outcome.finish_reason)
                    last.update(_usage(outcome.stats, prompt_tokens, outcome.finish_reason, job.dropped_messages))
                    yield _sse(last)
                else:
                    yield _sse(_outcome_error(outcome).body())
                yield "data: [DONE]\n\n"
                return
        finally:
            if not ended:
                self._abandon(job, body, started, prompt_tokens)

    def _abandon(self, job: Job, body: CompletionFields, started: float, prompt_tokens: int) -> None:
        """The client went away: cancel its job and log the request when the job's last message comes."""

        def log_last(message: Message) -> None:
            outcome = _ended(message, "")
            outcome.status, outcome.error = 499, "client disconnected"
            self._log(job.request_id, body, outcome, started, prompt_tokens)

        while not job.messages.empty():  # the last message may be here already
            message = job.messages.get_nowait()
            if message.kind != "delta":
                log_last(message)
                return
        job.abandoned = log_last
        self.queue.cancel(job)

    # ------------------------------------------------------------------ checks
    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def _check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.config.model_id:
            raise ApiError(
                404,
                f"the model {name!r} does not exist: this server serves {self.config.model_id!r}",
                param=param,
                code="model_not_found",
            )

    async def _read_json(self, request: Request) -> Any:
        """The body as JSON; 413 beyond ``max_request_bytes`` (checked while reading), 400 if not JSON."""
        limit = self.config.max_request_bytes
        too_large = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except (RecursionError, ValueError) as e:  # nesting too deep; an integer of over 4300 digits
            raise ApiError(400, f"the request body cannot be read: {e}", code="invalid_json") from None
        if _holds_lone_surrogate(body):
            raise ApiError(
                400,
                "the request holds a string that is not valid Unicode: a lone UTF-16 surrogate such as \\ud83d "
                "(half of an emoji, e.g. text cut in the middle of one). Send whole characters.",
                code="invalid_value",
            )
        return body

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.config.created, "owned_by": "specdec"}

    # ------------------------------------------------------------------ logging
    def _log(
        self, request_id: str, body: CompletionFields | None, outcome: Outcome, started: float, prompt_tokens: int = 0
    ) -> None:
        """One line per request: id, status, tokens, tok/s, method, accepted length, finish, seconds."""
        parts = [request_id, str(outcome.status)]
        s = outcome.stats
        if s is not None:
            parts += [
                f"prompt={prompt_tokens}",
                f"cached={s.cached_tokens}",
                f"completion={s.new_tokens}",
                f"tok/s={s.tokens_per_second:.1f}",
                f"method={s.method}",
                f"accepted={s.mean_accepted_length:.2f}",
            ]
        if outcome.finish_reason:
            parts.append(f"finish={outcome.finish_reason}")
        if body is not None and body.stream:
            parts.append("stream")
        if body is not None and body.ignored_fields():
            parts.append(f"ignored={','.join(body.ignored_fields())}")
        parts.append(f"{time.perf_counter() - started:.2f}s")
        if outcome.error:
            parts.append(f"error={outcome.error!r}")
        log.info(" ".join(parts))


# ---------------------------------------------------------------------- building answers
def _ended(message: Message, text: str) -> Outcome:
    """The outcome of a job's last message."""
    if message.kind == "done":
        return Outcome(text=text, finish_reason=message.finish_reason, stats=message.stats)
    if message.kind == "error":
        status = 400 if isinstance(message.error, SpecdecError) else 500
        return Outcome(status=status, text=text, error=_message(message.error))
    if message.kind == "stopped":
        return Outcome(status=503, text=text, stats=message.stats, error="the server is shutting down")
    return Outcome(status=499, text=text, stats=message.stats, error="cancelled")


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string (a key too) with a lone surrogate (JSON's ``"\\ud800"``)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


async def _gather(job: Job) -> Outcome:
    text = []
    while True:
        message = await job.messages.get()
        if message.kind != "delta":
            return _ended(message, "".join(text))
        text.append(message.text)


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body was read already, so only a disconnect is left to receive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _outcome_error(outcome: Outcome) -> ApiError:
    if outcome.status == 503:
        return ApiError(503, outcome.error, type="server_error", code="shutting_down")
    if outcome.status == 400:
        return ApiError(400, outcome.error)
    return ApiError(outcome.status, outcome.error, type="server_error")


def _message(error: BaseException | None) -> str:
    if isinstance(error, SpecdecError):
        return f"{error.message} ({error.hint})" if error.hint else error.message
    return f"internal error: {error!r}"


def _usage(
    stats: GenerationStats | None, prompt_tokens: int, finish_reason: str | None, dropped_messages: int = 0
) -> dict[str, Any]:
    """``usage`` (OpenAI's token counts; ``prompt_tokens_details.cached_tokens``: the prompt's first tokens
    kept from the previous request, e.g. a chat's earlier turns) and ``specdec`` (the generation's
    statistics, the engine's own finish reason: ``eos``, ``stop`` or ``length``, and with
    ``serve --fit-context``, ``dropped_messages``: the chat's oldest messages left out to fit the context)."""
    completion = stats.new_tokens if stats else 0
    extra: dict[str, Any] = {}
    if stats is not None:
        extra = stats.to_dict()
        for name in ("new_tokens", "prompt_tokens", "cached_tokens"):
            extra.pop(name)
    extra["finish_reason"] = finish_reason
    if dropped_messages:
        extra["dropped_messages"] = dropped_messages
    return {
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0},
        },
        "specdec": extra,
    }


def _completion(job: Job, config: ServerConfig, chat: bool, outcome: Outcome) -> dict[str, Any]:
    finish = _FINISH.get(outcome.finish_reason or "", "stop")
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": outcome.text},
            "finish_reason": finish,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": outcome.text, "finish_reason": finish, "logprobs": None}
    out = {
        "id": job.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": config.model_id,
        "choices": [choice],
    }
    out.update(_usage(outcome.stats, len(job.prompt_ids), outcome.finish_reason, job.dropped_messages))
    return out


def _chunk(
    request_id: str,
    config: ServerConfig,
    chat: bool,
    content: str | dict[str, str] | None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """One streamed chunk; ``content`` None with a ``finish_reason`` is the last one."""
    finish = _FINISH.get(finish_reason or "", "stop") if finish_reason else None
    if chat:
        delta = content if isinstance(content, dict) else ({"content": content} if content is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": config.model_id,
        "choices": [choice],
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# ---------------------------------------------------------------------- the application
def create_app(generator: SpeculativeGenerator, config: ServerConfig) -> Starlette:
    """The ASGI application; its lifespan starts the worker thread and, at shutdown, stops and joins it."""
    api = Api(generator, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        api.queue.start()
        log.info(
            "serving %s (method %s, context %d tokens) at %s/v1; at most %d requests wait",
            config.model_id,
            generator.method,
            generator.context_length,
            config.url,
            config.max_queue,
        )
        try:
            yield
        finally:
            api.queue.stop()
            await anyio.to_thread.run_sync(api.queue.join)
            log.info("stopped")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(
            ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        )

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, ApiError: api_error},
        middleware=_browser_access(config.allow_origins),
    )
    app.state.api = api
    return app


def _browser_access(origins: tuple[str, ...]) -> list[Middleware]:
    """CORS for ``origins`` (``serve --allow-origin``): a browser lets a page of one of them call the API (its
    preflight ``OPTIONS`` answered, ``Access-Control-Allow-Origin`` on the answers); none by default."""
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    ]


def begin_shutdown(app: Starlette) -> None:
    """Call as soon as a shutdown starts, before open connections are awaited: no new generation starts,
    waiting requests get 503, the running generation ends after its step."""
    app.state.api.queue.stop()
