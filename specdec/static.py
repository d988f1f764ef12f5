"""The static path: a preallocated KV cache, fixed row buckets and, on CUDA, captured graphs.

On a GPU a decode step of a small model is bound by kernel launches, not by
reading the weights: the eager forward launches hundreds of kernels for a few
rows. :class:`StaticKV` removes that cost the way graph-based decoders do:

- the cache (transformers' ``StaticCache``) is allocated once for a whole
  generation, ``capacity`` positions, rounded up to :data:`CAPACITY_STEP` so
  that later generations reuse it (and its graphs);
- a forward over ``t <= max(BUCKETS)`` rows runs at the smallest bucket
  ``R >= t``: the ``t`` real rows and ``R - t`` padding rows are written into
  static input buffers (tokens ``[1, R]``, positions ``[1, R]``, additive mask
  ``[1, 1, R, S]``); padding rows only see the cache and themselves, and
  whatever they write beyond the kept length is never seen by a real row;
- on CUDA each ``(R, hidden)`` forward is captured once as a CUDA graph and
  replayed; anything that fails to capture falls back to running the same
  buffers eagerly, with one log line;
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

from .errors import SpecdecError
from .kvcache import DynamicKV, Forward, KVCache, cache_argument, model_dtype, run_model, tree_mask

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Row counts a step runs at; a step of ``t`` rows runs at the smallest bucket ``>= t``."""
CAPACITY_STEP = 256
"""Cache sizes are rounded up to a multiple of this, so that generations of similar length share a cache."""
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")

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

    def __init__(self, model: torch.nn.Module, graphs: bool | None = None) -> None:
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
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._captured: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}
        self._pool = None

    # ------------------------------------------------------------------ cache
    def _restart(self, capacity: int, keep: int) -> int:
        """A larger ``capacity`` allocates a new cache and copies the kept prefix into it (a chat that
        outgrows its cache keeps its earlier turns; graphs are captured again, once per
        :data:`CAPACITY_STEP` of growth); else the cache is cropped to ``keep`` (what lies beyond is
        stale, never seen) or zeroed, in place, so buffers, graphs and addresses stay valid."""
        if self.cache is None or capacity > self.capacity:
            self._grow(-(-capacity // CAPACITY_STEP) * CAPACITY_STEP, min(keep, self.length))
        elif keep > 0:
            self.truncate(keep)
        else:
            self.cache.reset()
            self.length = 0
        return self.length

    def _grow(self, capacity: int, keep: int) -> None:
        """Replace the cache by one of ``capacity`` positions holding the old one's first ``keep``.

        Both caches exist while the prefix is copied; when the pair does not fit, the old one is
        dropped first and the prefix is computed again instead (the caller prefills what was not kept).
        """
        old = self.cache if keep > 0 else None
        self.length = 0
        try:
            self._allocate(capacity)
        except SpecdecError:
            if old is None:
                raise
            old = None
            self._allocate(capacity)
        if old is None:
            return
        for new_layer, old_layer in zip(self.cache.layers, old.layers):
            new_layer.keys[:, :, :keep].copy_(old_layer.keys[:, :, :keep])
            new_layer.values[:, :, :keep].copy_(old_layer.values[:, :, :keep])
            new_layer.cumulative_length.add_(keep)
        self.length = keep

    def _allocate(self, capacity: int) -> None:
        """A new cache of ``capacity`` positions (and no graphs: they point at the old one)."""
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        layers = text.num_hidden_layers
        need = 2 * layers * heads * head_dim * capacity * torch.finfo(self.dtype).bits // 8
        self.cache, self._buffers, self._captured, self._pool = None, {}, {}, None
        try:
            cache = StaticCache(config=cfg, max_cache_len=capacity)
            cache.early_initialization(1, heads, head_dim, self.dtype, self.device)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            raise SpecdecError(
                f"out of memory allocating the static KV cache: {need / 2**20:.0f} MiB for {capacity} positions",
                "use --no-static-cache (static_cache=False), or a shorter prompt / fewer new tokens",
            ) from None
        self.cache, self.capacity = cache, capacity

    def truncate(self, length: int) -> None:
        self.known = None
        if length < self.length:
            self._rewind(self.length - length)
            self.length = length

    def _rewind(self, n: int) -> None:
        """Move every layer's write position back by ``n >= 0`` positions (the data stays, unseen).

        ``StaticLayer.crop`` does this from transformers 5.2x on; before it (the webui's 5.6 pin) the
        position is the layer's own counter tensor, which ``update`` advances in place.
        """
        if n <= 0:
            return
        for layer in self.cache.layers:
            if hasattr(layer, "crop"):
                layer.crop(-n)
            else:
                layer.cumulative_length.sub_(n)

    def _gather(self, start: int, rows: list[int]) -> None:
        """Copy the accepted rows to ``[start, start + len(rows))`` in place, then crop."""
        idx = torch.tensor([start + r for r in rows], device=self.device)
        end = start + len(rows)
        for layer in self.cache.layers:
            layer.keys[:, :, start:end].copy_(layer.keys.index_select(2, idx))
            layer.values[:, :, start:end].copy_(layer.values.index_select(2, idx))
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
        rows = bucket(t)
        if rows is None or self.length + rows > self.capacity:
            return self._eager(tokens, positions, allowed, keep, hidden)
        ids, pos, mask = self._inputs(rows)
        self._fill(ids, pos, mask, tokens, positions, allowed)
        logits, last, captured = self._run(rows, hidden)
        self._rewind(rows - t)  # the step advanced every layer by `rows`; keep the real rows
        self.length += t
        logits, last = logits[0, t - keep : t], last[0, t - keep : t] if hidden else None
        if self.graphs:  # a graph's outputs are overwritten by its next replay
            logits, last = logits.clone(), last.clone() if hidden else None
        return Forward(logits, last, captured)

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

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The static buffers of bucket ``rows``: tokens ``[1, R]``, positions ``[1, R]``, mask ``[1, 1, R, S]``."""
        if rows not in self._buffers:
            self._buffers[rows] = (
                torch.zeros(1, rows, dtype=torch.long, device=self.device),
                torch.zeros(1, rows, dtype=torch.long, device=self.device),
                torch.zeros(1, 1, rows, self.capacity, dtype=self.dtype, device=self.device),
            )
        return self._buffers[rows]

    def _fill(self, ids, pos, mask, tokens, positions, allowed) -> None:
        """Write ``t`` real rows and ``R - t`` padding rows into the bucket's buffers."""
        t, rows, n = int(tokens.numel()), ids.shape[1], self.length
        ids[0, :t] = tokens.to(self.device)
        ids[0, t:] = ids[0, 0]
        if positions is None:
            positions = torch.arange(n, n + t, device=self.device)
        pos[0, :t] = positions.to(self.device)
        pos[0, t:] = n
        mask.copy_(tree_mask(allowed, t, n, self.capacity, self.dtype, self.device, rows=rows))

    def _call(self, rows: int, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, pos, mask = self._buffers[rows]
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask,
            use_cache=True,
            output_hidden_states=hidden,
            **{self.cache_arg: self.cache},
        )
        return out.logits, (out.hidden_states[-1] if hidden else None)

    def _run(self, rows: int, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Replay (capturing on first use) or run the bucket's forward; returns logits ``[1, R, V]``,
        hidden ``[1, R, H]`` or None, and the seconds spent capturing."""
        if not self.graphs:
            return (*self._call(rows, hidden), 0.0)
        key = (rows, hidden)
        captured = 0.0
        if key not in self._captured:
            t0 = time.perf_counter()
            try:
                self._captured[key] = self._capture(rows, hidden)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
                self.graphs = False
                log.warning(
                    "CUDA graph capture failed (%s: %s); steps run eagerly on the static cache",
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
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


def open_cache(model: torch.nn.Module, static: bool = False) -> KVCache:
    """A :class:`StaticKV` for ``model`` when ``static`` and the model can take one, else a
    :class:`~specdec.kvcache.DynamicKV`; why a static cache cannot be used is logged in one line."""
    if static:
        reason = static_support(model)
        if reason is None:
            return StaticKV(model)
        log.warning("static cache off for %s: %s; using the eager path", type(model).__name__, reason)
    return DynamicKV(model)
