"""KV cache bookkeeping: keep only what was accepted.

A rejection is a pointer move (crop) for chains; for trees and extra rows the
accepted rows are gathered and copied to the front of the new region.
Works on transformers' ``DynamicCache`` (layers with ``keys``/``values`` of
shape ``[batch, kv_heads, seq, head_dim]``).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes the cache: ``cache`` (transformers >= 5.2x)
    or ``past_key_values`` (earlier 5.x, e.g. the version text-generation-webui pins).
    Passing the wrong one silently runs without a cache there, so it is looked up once."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache for ``model``."""
    return DynamicCache(config=model.config)


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def truncate(cache: DynamicCache, length: int) -> None:
    """Drop every cached position from ``length`` on."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def keep_rows(cache: DynamicCache, start: int, rows: list[int]) -> None:
    """Keep positions ``[0, start)`` plus ``start + r`` for ``r`` in ``rows`` (in that order).

    ``rows`` that form a prefix ``0..k-1`` reduce to a crop.
    """
    if rows == list(range(len(rows))):
        truncate(cache, start + len(rows))
        return
    for layer in cache.layers:
        idx = torch.tensor([start + r for r in rows], device=layer.keys.device)
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, idx)], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, idx)], dim=-2)
