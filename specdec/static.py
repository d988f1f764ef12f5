"""The static path: a preallocated KV cache, fixed row buckets and, on CUDA, captured graphs.

On a GPU a decode step of a small model is bound by kernel launches, not by
reading the weights: the eager forward launches hundreds of kernels for a few
rows. :class:`StaticKV` removes that cost the way graph-based decoders do:

- the cache (transformers' ``StaticCache``) is allocated once for a whole
  generation, ``capacity`` positions, rounded up to :data:`CAPACITY_STEP` so
  that later generations reuse it (and its graphs);
- a forward over ``t <= max(BUCKETS)`` rows runs at the smallest bucket
  ``R >= t``: the ``t`` real rows and ``R - t`` padding rows are written into
  static input buffers (tokens ``[1, R]``; position offsets and the rows'
  visibility among themselves, one ``[R + R*R]`` buffer); padding rows only see
  the cache and themselves, and whatever they write beyond the kept length is
  never seen by a real row;
- the step's positions and its additive mask ``[1, 1, R, S]`` are computed from
  those buffers and the cache's own write position inside the step, so on a GPU
  a step launches a token copy, at most one small host-to-device copy and the
  graph, whatever the cache's width;
- every layer's keys, values and write position are views of three tensors,
  so a rewind, a rejection or a tree compaction is one operation for the whole
  cache rather than one per layer;
- on CUDA each ``(R, hidden)`` forward is captured once as a CUDA graph and
  replayed; anything that fails to capture falls back to running the same
  buffers eagerly, with one log line;
- optionally (``compile_steps``) the step is compiled by ``torch.compile``
  (inductor) before it is captured: a graph of eager kernels still launches
  every small kernel of every layer (about 40 a layer: norms, rotary
  embedding, cache writes, activations), the compiled step fuses them into a
  few (the matrix products and attention stay library calls). The row count
  and the cache's width are compiled as sizes that vary, so one compile
  serves every bucket above one row; a failed compile runs the step
  uncompiled, with one log line;
- longer forwards (a prompt) run eagerly with transformers' own causal mask
  over the static cache.

On a CPU the same path runs without capture, so the CPU tests cover every
part but the capture itself.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import StaticCache

from .errors import SpecdecError, StaticCacheMemoryError
from .kvcache import DynamicKV, Forward, KVCache, cache_argument, model_dtype, run_model, tree_mask

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Row counts a step runs at; a step of ``t`` rows runs at the smallest bucket ``>= t``."""
CAPACITY_STEP = 256
"""Cache sizes are rounded up to a multiple of this, so that generations of similar length share a cache."""
COMPILE_AHEAD_ROWS: tuple[int, ...] = (1, 2, 8)
"""Row counts that each compile a variant of a compiled step: one row (sizes 0 and 1 are always their own), a few
rows (a CPU's few-row kernels, :mod:`specdec.compact`, branch at ``KERNEL_MAX_ROWS``) and more. All are compiled at
a cache's first forward, so that no reply stops for a compile when its first one-row step comes (a draft that
always drafts may bring one only several replies later)."""
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
RECOMPILE_LIMIT = 64
"""How many compiled variants of the step dynamo keeps (its default, 8, is shared by every compiled step of the
process: a target and a draft, with and without hidden states, one row and more, would use them up)."""

log = logging.getLogger("specdec")


def static_support(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run on the static path, or None when it can."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "the model has no transformers config"
    attn = getattr(cfg, "_attn_implementation", None)
    if attn not in ATTENTION_IMPLEMENTATIONS:
        return f"attention implementation {attn!r} takes no 4D tree mask (use sdpa or eager)"
    if (
        getattr(cfg, "sliding_window", None)
        and getattr(cfg, "use_sliding_window", True)
        and any(t == "sliding_attention" for t in getattr(cfg, "layer_types", None) or ())
    ):
        return "sliding-window layers keep a rolling cache that cannot be rewritten in place"
    return None


def graph_support(model: torch.nn.Module) -> str | None:
    """Why ``model``'s static steps cannot be captured as CUDA graphs, or None when they can."""
    if next(model.parameters()).device.type != "cuda":
        return "graphs are captured on CUDA only"
    if getattr(model, "hf_quantizer", None) is not None:
        return "quantized layers (bitsandbytes, GPTQ) are not captured"
    return None


def bucket(rows: int) -> int | None:
    """The smallest bucket holding ``rows``, or None when none does."""
    for r in BUCKETS:
        if r >= rows:
            return r
    return None


class StaticKV(KVCache):
    """A preallocated cache whose steps run at fixed row buckets (captured as CUDA graphs on CUDA).

    Attributes:
        capacity: positions the cache holds (``S``).
        length: positions in use; positions beyond it hold stale rows that no mask lets through.
        graphs: whether steps are captured (CUDA only; False after a failed capture).
    """

    def __init__(self, model: torch.nn.Module, graphs: bool | None = None, compile_steps: bool = False) -> None:
        self.model = model
        self.cache_arg = cache_argument(model)
        self.device = next(model.parameters()).device
        self.dtype = model_dtype(model)
        if graphs is None:
            reason = graph_support(model)
            if reason is not None and self.device.type == "cuda":
                log.warning(
                    "CUDA graphs off for %s: %s; steps run eagerly on the static cache", type(model).__name__, reason
                )
            graphs = reason is None
        self.graphs = graphs
        self.cache: StaticCache | None = None
        self.capacity = 0
        self.length = 0
        self._kv: torch.Tensor | None = None  # [2, L, 1, KV heads, S, head dim]: every layer's keys and values
        self._counts: torch.Tensor | None = None  # [L] long: every layer's write position
        self._columns: torch.Tensor | None = None  # [S] long: 0 .. S-1
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layout: dict[int, tuple] = {}  # what each bucket's layout buffer holds, to skip rewriting it
        self._captured: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}
        self._pool = None
        self._compiled = torch.compile(bucket_step) if compile_steps else None
        self._ahead: set[bool] = set()  # the `hidden` values whose step variants are compiled

    @property
    def compiled(self) -> bool:
        """Whether steps run compiled by ``torch.compile`` (False when not asked for or after a failed compile)."""
        return self._compiled is not None

    # ------------------------------------------------------------------ cache
    def _restart(self, capacity: int, keep: int) -> int:
        """A larger ``capacity`` allocates a new cache and copies the kept prefix into it (a chat that
        outgrows its cache keeps its earlier turns; graphs are captured again, once per
        :data:`CAPACITY_STEP` of growth); else the cache is cropped to ``keep``, in place, so buffers,
        graphs and addresses stay valid (what lies beyond is stale: finite values of earlier forwards
        that no mask lets through)."""
        if self.cache is None or capacity > self.capacity:
            self._grow(-(-capacity // CAPACITY_STEP) * CAPACITY_STEP, min(keep, self.length))
        else:
            self.truncate(keep)
        return self.length

    def _grow(self, capacity: int, keep: int) -> None:
        """Replace the cache by one of ``capacity`` positions holding the old one's first ``keep``.

        Both caches exist while the prefix is copied; when the pair does not fit, the old one is
        dropped first and the prefix is computed again instead (the caller prefills what was not kept).
        """
        old = self._kv if keep > 0 else None
        self.length = 0
        try:
            self._allocate(capacity)
        except StaticCacheMemoryError:
            if old is None:
                raise
            old = None
            self._allocate(capacity)
        if old is None:
            return
        self._kv[:, :, :, :, :keep].copy_(old[:, :, :, :, :keep])
        self._counts.fill_(keep)
        self.length = keep

    def _allocate(self, capacity: int) -> None:
        """A new cache of ``capacity`` positions (and no graphs: they point at the old one)."""
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        layers = text.num_hidden_layers
        need = 2 * layers * heads * head_dim * capacity * torch.finfo(self.dtype).bits // 8
        self.cache, self._buffers, self._layout, self._captured, self._pool = None, {}, {}, {}, None
        self._kv = self._counts = None
        try:
            cache = StaticCache(config=cfg, max_cache_len=capacity)
            kv = torch.zeros(2, layers, 1, heads, capacity, head_dim, dtype=self.dtype, device=self.device)
            counts = torch.zeros(layers, dtype=torch.long, device=self.device)
            empty = torch.empty(1, heads, 0, head_dim, dtype=self.dtype, device=self.device)
            for i, layer in enumerate(cache.layers):
                layer.lazy_initialization(empty, empty)  # sets the layer's sizes, allocates one layer...
                layer.keys, layer.values, layer.cumulative_length = kv[0, i], kv[1, i], counts[i]  # ...then shares
                if self._compiled is not None:  # a compiled step serves every width (see mark_dynamic)
                    torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
                    torch._dynamo.maybe_mark_dynamic(layer.values, 2)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            raise StaticCacheMemoryError(need / 2**20, capacity) from None
        self.cache, self.capacity = cache, capacity
        self._kv, self._counts = kv, counts
        self._columns = torch.arange(capacity, device=self.device)

    def truncate(self, length: int) -> None:
        self.known = None
        if length < self.length:
            self._rewind(self.length - length)
            self.length = length

    def _rewind(self, n: int) -> None:
        """Move every layer's write position back by ``n >= 0`` positions (the data stays, unseen).

        The positions are the layers' own counters, which ``StaticLayer.update`` advances in place; they
        are views of one tensor, so this is one operation.
        """
        if n > 0:
            self._counts.sub_(n)

    def _gather(self, start: int, rows: list[int]) -> None:
        """Copy the accepted rows to ``[start, start + len(rows))`` in place (every layer at once), then crop."""
        idx = torch.tensor([start + r for r in rows], device=self.device)
        end = start + len(rows)
        self._kv[:, :, :, :, start:end].copy_(self._kv.index_select(4, idx))
        self.truncate(end)

    # ------------------------------------------------------------------ forwards
    def forward(self, tokens, positions=None, allowed=None, keep=1, hidden=False) -> Forward:
        self.known = None
        t = int(tokens.numel())
        if self.length + t > self.capacity:
            raise SpecdecError(
                f"the static cache holds {self.capacity} positions, a forward needs {self.length + t}",
                "this is a bug in specdec: please report it",
            )
        ahead = self._compile_ahead(hidden) if self._compiled is not None and hidden not in self._ahead else 0.0
        rows = bucket(t)
        if rows is None or self.length + rows > self.capacity:
            out = self._eager(tokens, positions, allowed, keep, hidden)
            out.captured += ahead
            return out
        self._fill(rows, tokens, positions, allowed)
        logits, last, captured = self._run(rows, hidden)
        captured += ahead
        self._rewind(rows - t)  # the step advanced every layer by `rows`; keep the real rows
        self.length += t
        logits, last = logits[0, t - keep : t], last[0, t - keep : t] if hidden else None
        if self.graphs:  # a graph's outputs are overwritten by its next replay
            logits, last = logits.clone(), last.clone() if hidden else None
        return Forward(logits, last, captured)

    def _compile_ahead(self, hidden: bool) -> float:
        """Compile (and on CUDA capture) the step for each of :data:`COMPILE_AHEAD_ROWS` now, over padding rows
        written beyond the cache's length and rewound (unseen, like any padding row); the seconds it took."""
        self._ahead.add(hidden)
        spent = 0.0
        for rows in COMPILE_AHEAD_ROWS:
            if self._compiled is None or self.length + rows > self.capacity:
                break  # a failed compile runs the steps uncompiled: nothing to compile ahead
            self._fill(rows, torch.zeros(rows, dtype=torch.long, device=self.device), None, None)
            spent += self._run(rows, hidden)[2]
            self._rewind(rows)
        return spent

    def _eager(self, tokens, positions, allowed, keep, hidden) -> Forward:
        """A forward beyond the buckets (a prompt): causal rows use transformers' own static mask."""
        t = int(tokens.numel())
        mask = None
        if allowed is not None or positions is not None:
            mask = tree_mask(allowed, t, self.length, self.capacity, self.dtype, self.device)
        if positions is None:
            positions = torch.arange(self.length, self.length + t, device=self.device)
        out = run_model(
            self.model,
            self.cache_arg,
            self.cache,
            tokens.to(self.device),
            positions.to(self.device),
            mask,
            keep,
            hidden,
        )
        self.length += t
        return out

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static buffers of bucket ``rows``: tokens ``[1, R]`` and the layout ``[R + R*R]`` long
        (each row's position offset from the cache's length, then the rows' visibility among
        themselves, ``[R, R]`` as 0/1)."""
        if rows not in self._buffers:
            self._buffers[rows] = (
                torch.zeros(1, rows, dtype=torch.long, device=self.device),
                torch.zeros(rows + rows * rows, dtype=torch.long, device=self.device),
            )
        return self._buffers[rows]

    def _fill(self, rows: int, tokens: torch.Tensor, positions: torch.Tensor | None, allowed) -> None:
        """Write ``t`` real rows and ``R - t`` padding rows into bucket ``rows``' buffers.

        The layout is written only when it differs from what the buffer holds: a run of one-row steps (or
        of causal steps of one size) copies nothing but its tokens. Padding rows keep the tokens of an
        earlier step (any token will do), sit at offset 0 and see the cache and themselves.
        """
        t = int(tokens.numel())
        ids, layout = self._inputs(rows)
        ids[0, :t].copy_(tokens)
        key = ("causal", t) if positions is None and allowed is None else None
        if key is not None and self._layout.get(rows) == key:
            return
        host = torch.zeros(rows + rows * rows, dtype=torch.long)
        if positions is not None:
            host[:t] = positions.cpu() - self.length
        else:
            host[:t] = torch.arange(t)
        seen = host[rows:].view(rows, rows)
        seen[:t, :t] = allowed.cpu() if allowed is not None else torch.ones(t, t, dtype=torch.bool).tril()
        seen.diagonal()[t:] = 1
        layout.copy_(host)
        self._layout[rows] = key

    def _call(self, rows: int, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The bucket's forward (:func:`bucket_step` over its buffers; compiled when asked for): logits
        ``[1, R, V]`` and hidden ``[1, R, H]`` or None. This is what a graph captures."""
        ids, layout = self._buffers[rows]
        offsets, visible = layout[:rows], layout[rows:].view(rows, rows)
        args = (self.model, self.cache_arg, self.cache, ids, offsets, visible, self._counts, self._columns, self.dtype)
        if self._compiled is not None:
            mark_dynamic(ids, offsets, visible, self._columns)
            try:
                # only the sizes mark_dynamic marks vary: a size that dynamo would make dynamic because another
                # model (a draft of other shapes, through the same step function) compiled first fails to compile
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, automatic_dynamic_shapes=False):
                    return self._compiled(*args, hidden)
            except Exception as e:  # noqa: BLE001 - any compile failure means: run uncompiled
                self._compiled = None
                self._counts.fill_(self.length)  # a step cut short may have advanced the write positions
                log.warning("torch.compile of the static steps failed (%s); steps run uncompiled", _reason(e))
        return bucket_step(*args, hidden)

    def _run(self, rows: int, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Replay (capturing on first use) or run the bucket's forward; returns logits ``[1, R, V]``,
        hidden ``[1, R, H]`` or None, and the seconds spent capturing."""
        if not self.graphs:
            compiles = compiled_graphs() if self._compiled is not None else None
            t0 = time.perf_counter()
            logits, last = self._call(rows, hidden)
            if compiles is None or compiled_graphs() == compiles:
                return logits, last, 0.0
            return logits, last, time.perf_counter() - t0  # the step compiled: one-time work, like a capture
        key = (rows, hidden)
        captured = 0.0
        if key not in self._captured:
            t0 = time.perf_counter()
            try:
                self._captured[key] = self._capture(rows, hidden)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
                self.graphs = False
                log.warning("CUDA graph capture failed (%s); steps run eagerly on the static cache", _reason(e))
                return (*self._call(rows, hidden), 0.0)
            captured = time.perf_counter() - t0
        graph, logits, last = self._captured[key]
        graph.replay()
        return logits, last, captured

    def _capture(self, rows: int, hidden: bool):
        """Capture the bucket's forward as a CUDA graph over the static buffers and cache.

        The warm-up runs advance the cache like a step does; they are cropped back, and what they wrote
        beyond ``length`` is stale like any padding row's. The graph is replayed once on the warm-up's
        inputs and must give the eager forward's logits, or it is not used.
        """
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                eager = self._call(rows, hidden)[0].clone()
                self._rewind(rows)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, last = self._call(rows, hidden)
        graph.replay()
        self._rewind(rows)
        if not torch.allclose(logits.float(), eager.float(), rtol=1e-3, atol=1e-3):
            worst = float((logits.float() - eager.float()).abs().max())
            raise RuntimeError(f"the replayed graph's logits differ from the eager forward's by up to {worst:.3g}")
        return graph, logits, last


def check_compile_steps(static_cache: bool | None, compile_steps: bool) -> None:
    """Refuse compiled steps without the static cache (they are its steps)."""
    if compile_steps and static_cache is False:
        raise SpecdecError(
            "compile_steps compiles the static path's steps, and static_cache is False",
            "drop --no-static-cache (static_cache=False), or drop --compile-steps",
        )


def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` has compiled in this process (a step that raised it compiled)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _reason(error: Exception) -> str:
    """``Type: first line of the message`` for a one-line log."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def mark_dynamic(ids: torch.Tensor, offsets: torch.Tensor, visible: torch.Tensor, columns: torch.Tensor) -> None:
    """Let ``torch.compile`` treat a step's row count and the cache's width as sizes that vary.

    ``ids [1, R]``, ``offsets [R]``, ``visible [R, R]`` and ``columns [S]``: a step's inputs (:func:`bucket_step`).
    Only these dimensions are marked: with every size dynamic, a bucket of as many rows as the head dimension would
    share its symbol and be specialised with it. A one-row step stays its own variant (sizes 0 and 1 always are).
    """
    for tensor, dims in ((ids, (1,)), (offsets, (0,)), (visible, (0, 1)), (columns, (0,))):
        for dim in dims:
            if tensor.shape[dim] > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


def bucket_step(
    model: torch.nn.Module,
    cache_arg: str,
    cache: StaticCache,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    visible: torch.Tensor,
    counts: torch.Tensor,
    columns: torch.Tensor,
    dtype: torch.dtype,
    hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One static step: positions and mask from a bucket's buffers and the cache's write position, then the model.

    Args:
        ids: ``[1, R]`` the bucket's tokens (real rows, then padding).
        offsets: ``[R]`` long, each row's position offset from the cache's length.
        visible: ``[R, R]`` long, which of the step's rows each row sees (0/1).
        counts: ``[L]`` long, every layer's write position (all equal: the cache's length before the step).
        columns: ``[S]`` long, ``0 .. S-1`` (``S``: the cache's capacity).

    Returns:
        logits ``[1, R, V]`` and, when ``hidden``, the final hidden states ``[1, R, H]`` (else None).
    """
    rows = ids.shape[1]
    start = counts[0]  # the cache's length before this forward, on the device
    pos = (offsets + start)[None]  # [1, R]
    rel = columns - start  # [S]: each cache column's offset from the step's first row
    seen = visible.bool()[:, rel.clamp(0, rows - 1)] & (rel >= 0) & (rel < rows)
    seen |= rel < 0  # [R, S]: the cache, and what each row may see among the step's rows
    mask = torch.zeros(rows, columns.shape[0], dtype=dtype, device=ids.device)
    mask.masked_fill_(~seen, torch.finfo(dtype).min)
    out = model(
        input_ids=ids,
        position_ids=pos,
        attention_mask=mask[None, None],
        use_cache=True,
        output_hidden_states=hidden,
        **{cache_arg: cache},
    )
    return out.logits, (out.hidden_states[-1] if hidden else None)


def open_cache(model: torch.nn.Module, static: bool = False, compile_steps: bool = False) -> KVCache:
    """A :class:`StaticKV` for ``model`` when ``static`` and the model can take one (its steps compiled when
    ``compile_steps``), else a :class:`~specdec.kvcache.DynamicKV`; why a static cache cannot be used is logged in
    one line."""
    if static:
        reason = static_support(model)
        if reason is None:
            return StaticKV(model, compile_steps=compile_steps)
        log.warning("static cache off for %s: %s; using the eager path", type(model).__name__, reason)
    return DynamicKV(model)
