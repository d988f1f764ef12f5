"""One model, one generation at a time: a FIFO of jobs served by a single worker thread.

The event loop never runs the model: a request becomes a :class:`Job`, the
worker thread runs it through :meth:`SpeculativeGenerator.stream` and hands
each text delta back to the loop with ``call_soon_threadsafe``. A job is
cancelled between two decoding steps (the stream is closed after the step in
progress), or taken out of the queue if it has not started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import GenerationStats, SpeculativeGenerator
from ..errors import SpecdecError

log = logging.getLogger("specdec.server")


@dataclass
class Message:
    """What the worker hands to the request's coroutine.

    ``kind`` is ``"delta"`` (``text``), ``"done"`` (``finish_reason``,
    ``stats``), ``"error"`` (``error``), ``"cancelled"`` (``stats`` so far, or
    None when it never started) or ``"stopped"`` (the server is shutting down).
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Job:
    """One generation: token ids in, messages out on ``loop``'s queue ``messages``.

    Attributes:
        request_id: the id the response carries (for logs).
        prompt_ids: ``[P]`` token ids of the rendered prompt.
        sampling: keyword arguments of :meth:`SpeculativeGenerator.stream` besides the prompt.
        dropped_messages: the chat's oldest messages left out to fit the context (``serve --fit-context``).
    """

    request_id: str
    prompt_ids: list[int]
    sampling: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    dropped_messages: int = 0
    messages: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    abandoned: Callable[[Message], None] | None = None
    """Set (on the loop) when nobody reads ``messages`` any more: it gets the last message instead."""

    def send(self, message: Message) -> None:
        """Hand a message to the loop (from any thread); a closed loop drops it."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, message)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def _deliver(self, message: Message) -> None:
        if self.abandoned is None:
            self.messages.put_nowait(message)
        elif message.kind != "delta":
            self.abandoned(message)


class QueueFullError(Exception):
    """``max_waiting`` jobs are already waiting."""


class StoppingError(Exception):
    """The server is shutting down and takes no new job."""


class GenerationQueue:
    """Runs jobs one at a time, in arrival order, on one worker thread.

    Args:
        generator: the loaded model; only the worker thread uses it.
        max_waiting: jobs that may wait while one runs; one more is refused
            (:class:`QueueFullError`). A job's slot is freed before its last
            message is sent, so a client that sends its next request as soon
            as the answer arrives always finds room.
    """

    def __init__(self, generator: SpeculativeGenerator, max_waiting: int) -> None:
        self.generator = generator
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="specdec-generation", daemon=True)

    # ------------------------------------------------------------------ the loop's side
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise :class:`QueueFullError` or :class:`StoppingError`."""
        with self._cond:
            if self._stopping:
                raise StoppingError()
            if len(self._waiting) + (self._running is not None) > self.max_waiting:
                raise QueueFullError()
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or end a running one after its current step."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.send(Message("cancelled"))
                return
        job.cancel_requested.set()

    def stop(self) -> None:
        """Take no new job, drop the waiting ones, end the running one after its step."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            running = self._running
            self._cond.notify_all()
        for job in waiting:
            job.send(Message("stopped"))
        if running is not None:
            running.cancel_requested.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        """``{"running": request id or None, "waiting": n, "max_waiting": m}`` for /health."""
        with self._cond:
            return {
                "running": self._running.request_id if self._running else None,
                "waiting": len(self._waiting),
                "max_waiting": self.max_waiting,
            }

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._running = self._waiting.popleft()
            last = self._run(job)
            with self._cond:
                self._running = None
            job.send(last)

    def _run(self, job: Job) -> Message:
        """Stream ``job`` until it ends or is cancelled; return its last message (not yet sent).

        Whatever fails, the values ``stream()`` checks when called included, ends this job only.
        """
        stream = None
        try:
            stream = self.generator.stream(job.prompt_ids, **job.sampling)
            for event in stream:
                if event.text:
                    job.send(Message("delta", text=event.text))
                if event.done:
                    return Message("done", finish_reason=event.finish_reason, stats=dataclasses.replace(event.stats))
                if job.cancel_requested.is_set():
                    stats = self.generator.last_stats
                    kind = "stopped" if self._stopping else "cancelled"
                    return Message(kind, stats=dataclasses.replace(stats) if stats else None)
            return Message("error", error=RuntimeError("the generation ended without a last event"))
        except SpecdecError as e:
            return Message("error", error=e)
        except Exception as e:  # keep serving: the request gets a 500, the log the traceback
            log.exception("%s: generation failed", job.request_id)
            return Message("error", error=e)
        finally:
            if stream is not None:
                stream.close()
