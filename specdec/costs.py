"""Cost of a target forward by the number of rows it verifies.

Every method trades extra rows in one target forward for fewer forwards, so
what a forward over ``r`` rows costs relative to a one-row forward decides how
much to propose. This module owns that model:

- the *prior*: relative costs measured once per kind of compute
  (:data:`PRIORS`: the GPU, a CPU in bfloat16 with and without bfloat16
  instructions, a CPU in float32; :func:`cost_kind`), interpolated by
  :func:`row_cost` and chosen by :func:`prior`. Decisions rest on it before
  anything is measured, and always under seeded sampling, whose tokens must
  not depend on timings;
- learning on the machine at hand: :class:`RowCostModel` refits the prior's
  shape to the forwards measured while decoding (Medusa's tree sizes); the
  draft-length controller (:class:`specdec.adaptive.DraftLengthController`)
  keeps seconds per row count and extrapolates them with the prior's shape;
- measuring it directly: :func:`forward_cost` times forwards of each row count
  on a cached prompt, :func:`measure_row_cost` turns that into a table like
  the priors (Medusa training stores one with its heads).

Where the figures come from, and the other measurements of this project, is in
docs/design.md ("Cost of a forward by row count").
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .devices import cpu_computes_natively

RowCost = Callable[[int], float]  # rows -> cost of a forward over that many rows (relative or seconds)

# Relative cost of one target forward over r rows (the pending token + candidates) on a
# cached prompt, measured on the reference CPU (2 cores, bfloat16 with avx512_bf16,
# Qwen2.5-Coder-1.5B): 16 rows cost 1.32x one, 64 rows 2.7x (4 rows measured no dearer than one).
CPU_ROW_COST: dict[int, float] = {1: 1.0, 4: 0.98, 8: 1.09, 16: 1.32, 32: 1.78, 64: 2.7}
# The same model in float32 on the same kind of CPU, with the few-row products that
# specdec.linear.FewRowLinear computes (as load_model gives a float32 CPU model): 4 rows cost
# about one (nn.Linear's own: 2 rows already 1.97x one, 16 rows 2.19x).
CPU_FP32_ROW_COST: dict[int, float] = {1: 1.0, 2: 0.89, 4: 1.1, 8: 1.6, 16: 1.77, 32: 2.64, 64: 4.99}
# A 16-bit float on a CPU without its instructions (bfloat16 without avx512_bf16/AMX, float16
# without AMX-FP16): every row is converted on its own, so rows cost almost whole forwards.
# Measured in float16 on the reference CPU; bfloat16 on an AVX2 CPU gave 1.77/3.52/6.46/12.4x
# for 2/4/8/16 rows.
CPU_EMULATED_ROW_COST: dict[int, float] = {1: 1.0, 2: 1.77, 4: 2.44, 8: 5.06, 16: 9.61, 32: 18.9, 64: 34.7}
# The same on an NVIDIA H100 (float16, a model of Qwen2.5-Coder-1.5B's size, under the
# engine's tree mask; scripts/gpu_profile.py, docs/bench/gpu-h100-profile-random-weights.json):
# launch-bound, so rows are nearly free (64 rows 1.12x one).
GPU_ROW_COST: dict[int, float] = {1: 1.0, 2: 1.07, 4: 1.10, 16: 1.10, 64: 1.12}

# The prior of each kind of compute (:func:`cost_kind`).
PRIORS: dict[str, dict[int, float]] = {
    "cuda": GPU_ROW_COST,
    "cpu": CPU_ROW_COST,
    "cpu-fp32": CPU_FP32_ROW_COST,
    "cpu-emulated": CPU_EMULATED_ROW_COST,
}


def row_cost(rows: int, table: dict[int, float] | None = None) -> float:
    """Relative cost of a forward over ``rows`` rows, interpolated linearly in ``table``
    (default :data:`CPU_ROW_COST`) and extrapolated along its last segment."""
    table = table or CPU_ROW_COST
    xs = sorted(table)
    if rows <= xs[0]:
        return table[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if rows <= b:
            return table[a] + (table[b] - table[a]) * (rows - a) / (b - a)
    a, b = xs[-2], xs[-1]  # extrapolate the last segment
    return table[b] + (table[b] - table[a]) * (rows - b) / (b - a)


def cost_kind(device_type: str, dtype: torch.dtype) -> str:
    """The key of :data:`PRIORS` for a model on ``device_type`` computing in ``dtype``.

    ``"cuda"`` on CUDA; on a CPU ``"cpu-fp32"`` in float32, ``"cpu"`` in a 16-bit float it has
    instructions for (:func:`specdec.devices.cpu_computes_natively`), else ``"cpu-emulated"``;
    other devices (MPS: not measured) take the CPU's.
    """
    if device_type == "cuda":
        return "cuda"
    if device_type != "cpu":
        return "cpu"
    if dtype == torch.float32:
        return "cpu-fp32"
    return "cpu" if cpu_computes_natively(dtype) else "cpu-emulated"


def model_cost_kind(model: torch.nn.Module) -> str:
    """:func:`cost_kind` of the device and compute dtype of ``model``'s weights."""
    param = next(model.parameters())
    return cost_kind(param.device.type, getattr(model, "dtype", param.dtype))


def prior_table(kind: str) -> dict[int, float]:
    """The measured table of a kind of compute (:func:`cost_kind`; an unknown kind gets the CPU's)."""
    return PRIORS.get(kind, CPU_ROW_COST)


def prior(kind: str, monotone: bool = False) -> RowCost:
    """``rows -> relative cost`` from the measured table of a kind of compute (:func:`prior_table`).

    With ``monotone``, more rows never cost less than fewer (the CPU table's 4 rows
    at 0.98x one become 1.0x), as :func:`measure_row_cost` stores a table.
    """
    table = prior_table(kind)
    return functools.partial(row_cost, table=relative_cost(table, monotone=True) if monotone else table)


@dataclass
class RowCostModel:
    """Relative cost of a target forward over ``r`` rows on this machine, learnt as it decodes.

    Fits ``seconds = c * prior(r) + d * (r - 1)`` to the measured forwards by
    exponentially weighted least squares (``forget`` per new measurement): the
    prior's shape scaled to this machine's level, plus a correction per row,
    held toward zero as if ``ridge`` rows squared of spread had been seen, so
    that steps that all have about the same rows keep the prior's shape. Until
    ``min_samples`` forwards are measured, and always in ``deterministic``
    mode (seeded sampling, whose tokens must not depend on timings), the prior
    alone answers. Measurements carry over from one generation to the next:
    the cost is the machine's.

    Calling the model gives ``cost(rows) / cost(1)`` (never below 1 once
    measured), what :func:`specdec.medusa.choices.best_size` weighs expected
    tokens against.
    """

    prior: RowCost
    forget: float = 0.97
    min_samples: int = 8
    ridge: float = 4.0
    deterministic: bool = False
    samples: int = 0
    # weighted sums over measurements, with p = prior(rows), x = rows - 1, s = seconds
    _sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("w", "pp", "px", "xx", "ps", "xs"), 0.0))

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> RowCostModel:
        """A model starting from the prior of the compute ``model`` runs on (:func:`model_cost_kind`)."""
        return cls(prior=prior(model_cost_kind(model)))

    def start(self, deterministic: bool) -> None:
        """Begin a generation; ``deterministic`` = answer from the prior alone."""
        self.deterministic = deterministic

    def record(self, rows: int, seconds: float) -> None:
        """One measured target forward over ``rows`` rows."""
        if rows < 1 or not seconds > 0:
            return
        p, x = self.prior(rows), float(rows - 1)
        for key, value in (
            ("w", 1.0),
            ("pp", p * p),
            ("px", p * x),
            ("xx", x * x),
            ("ps", p * seconds),
            ("xs", x * seconds),
        ):
            self._sums[key] = self.forget * self._sums[key] + value
        self.samples += 1

    @property
    def measured(self) -> bool:
        return self.samples >= self.min_samples and not self.deterministic

    def fit(self) -> tuple[float, float]:
        """``(c, d)`` of the fitted ``seconds = c * prior(rows) + d * (rows - 1)``."""
        m = self._sums
        a11, a12, a22 = m["pp"], m["px"], m["xx"] + self.ridge * m["w"]
        det = a11 * a22 - a12 * a12
        return (a22 * m["ps"] - a12 * m["xs"]) / det, (a11 * m["xs"] - a12 * m["ps"]) / det

    def __call__(self, rows: int) -> float:
        relative = self.prior(rows) / self.prior(1)
        if not self.measured:
            return relative
        c, d = self.fit()
        if c <= 0:  # noise no line explains: keep the prior
            return relative
        return max(relative + d * (rows - 1) / (c * self.prior(1)), 1.0)


def forward_cost(
    model: torch.nn.Module,
    rows: Sequence[int] = (1, 4, 8, 16, 32, 64),
    prompt_length: int = 128,
    repeats: int = 5,
) -> dict[int, float]:
    """Fastest seconds of one forward over ``k`` new rows on a cached prompt, for each ``k`` in ``rows``.

    The prompt's KV cache is built once; each timed forward appends ``k`` rows
    (``input_ids`` ``[1, k]``, full logits ``[1, k, V]``) and is then cropped
    away again, so every forward sees the same ``prompt_length`` cached positions,
    the way the decode loop calls the model. The row counts are timed in
    interleaved rounds (a slow spell of the machine hits every count alike):
    ``repeats`` timed rounds follow one warm-up round, and each count keeps its
    fastest round (interference only adds time).
    """
    from . import kvcache  # imports transformers, which the CLI's start (medusa.choices -> costs) leaves out

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


def measure_row_cost(
    target: torch.nn.Module,
    rows: Sequence[int] = (1, 4, 8, 16, 32, 64),
    context: int = 128,
    repeats: int = 5,
) -> dict[int, float]:
    """Relative cost of a target forward over ``r`` rows on a cached context (1 row = 1.0),
    never decreasing with ``r``: a table for :func:`row_cost`."""
    return relative_cost(forward_cost(target, rows, prompt_length=context, repeats=repeats), monotone=True)
