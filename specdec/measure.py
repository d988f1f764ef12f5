"""Measure the target's forward cost against the number of rows in one step.

Speculative methods trade rows per forward for steps: whether a 16-row step
pays off depends on how much more it costs than a 1-row step on this machine.
:func:`forward_cost` times that directly (on a cached prompt, the way the
decode loop calls the model), so defaults such as lookahead's window and the
hardware profiles can be chosen from measurements. Timings are noisy: the row
counts are timed in interleaved rounds (a slow spell of the machine hits every
count alike) and each keeps its fastest round (interference only adds time);
compare the returned ratios, measured in one process.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from . import kvcache


def forward_cost(
    model: torch.nn.Module,
    rows: Sequence[int] = (1, 4, 8, 16, 32, 64),
    prompt_length: int = 128,
    repeats: int = 5,
) -> dict[int, float]:
    """Fastest seconds of one forward over ``k`` new rows on a cached prompt, for each ``k`` in ``rows``.

    The prompt's KV cache is built once; each timed forward appends ``k`` rows
    (``input_ids`` ``[1, k]``, full logits ``[1, k, V]``) and is then cropped
    away again, so every forward sees the same ``prompt_length`` cached positions.
    ``repeats`` timed rounds over every ``k`` follow one warm-up round.
    """
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab, (1, prompt_length), generator=gen).to(device)
    cache = kvcache.new_cache(model)
    arg = kvcache.cache_argument(model)
    inputs = {k: torch.randint(vocab, (1, k), generator=gen).to(device) for k in rows}
    times: dict[int, list[float]] = {k: [] for k in rows}
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{arg: cache})
        for _ in range(repeats + 1):  # the first round warms up
            for k in rows:
                t0 = time.perf_counter()
                model(input_ids=inputs[k], use_cache=True, **{arg: cache})
                times[k].append(time.perf_counter() - t0)
                kvcache.truncate(cache, prompt_length)
    return {k: min(t[1:]) for k, t in times.items()}


def relative_cost(costs: dict[int, float], monotone: bool = False) -> dict[int, float]:
    """Each cost divided by the cost of the fewest rows (``{1: 1.0, 16: 1.3, ...}``).

    With ``monotone``, a bigger forward is never reported cheaper than a smaller
    one (timing noise otherwise makes small trees look free).
    """
    base = costs[min(costs)]
    out: dict[int, float] = {}
    floor = 0.0
    for k in sorted(costs):
        floor = max(floor, costs[k] / base) if monotone else costs[k] / base
        out[k] = round(floor, 3) if monotone else floor
    return out
