"""The server's generation queue on a tiny real model, without HTTP: a job that fails ends alone."""

from __future__ import annotations

import asyncio

import pytest

import specdec
from conftest import tiny_model
from specdec.errors import InvalidSamplingError
from specdec.server.worker import GenerationQueue, Job, Message


async def _last(job: Job) -> Message:
    """The job's last message (deltas skipped)."""
    while True:
        message = await asyncio.wait_for(job.messages.get(), timeout=60)
        if message.kind != "delta":
            return message


async def _run_jobs(queue: GenerationQueue, samplings: list[dict]) -> list[Message]:
    loop = asyncio.get_running_loop()
    jobs = [Job(f"job-{i}", [1, 2, 3], sampling, loop) for i, sampling in enumerate(samplings)]
    for job in jobs:
        queue.submit(job)
    return [await _last(job) for job in jobs]


@pytest.mark.parametrize("bad", [dict(temperature=float("inf")), dict(seed=2**70), dict(top_k=-1)])
def test_a_value_refused_when_the_stream_starts_ends_that_job_only(bad):
    gen = specdec.SpeculativeGenerator(tiny_model("llama", seed=0), method="prompt_lookup")
    queue = GenerationQueue(gen, max_waiting=4)
    queue.start()
    try:
        first, second = asyncio.run(_run_jobs(queue, [{"max_new_tokens": 4, **bad}, {"max_new_tokens": 4}]))
    finally:
        queue.stop()
        queue.join(timeout=60)
    assert first.kind == "error" and isinstance(first.error, InvalidSamplingError)
    assert second.kind == "done" and second.stats.new_tokens == 4
