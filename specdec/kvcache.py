"""KV caches behind one interface: forward new rows, keep only what was accepted.

Every model forward of the decode loop (the target's prefill and steps, the
draft's proposals) goes through a :class:`KVCache`:

- :class:`DynamicKV` grows transformers' ``DynamicCache`` as tokens come;
  a rejection is a crop, a tree's accepted path is gathered and concatenated.
- :class:`specdec.static.StaticKV` preallocates the cache once per
  generation and runs each step at a fixed row bucket, so that on CUDA the
  step can be a captured graph (:func:`specdec.static.open_cache` picks one).

Terms: ``length`` positions are cached; a forward over ``t`` new rows writes
them at ``[length, length + t)``. The new rows see every cached position and,
among themselves, what ``allowed`` (``[t, t]`` bool, None = causal) permits.

*Prefix reuse.* A chat resends its whole history every turn. The owner of a
cache says which token ids its first positions hold once they are final
(:meth:`KVCache.remember`); the next generation's :meth:`KVCache.start` keeps
the longest common prefix of those ids and its prompt, so only the rest is
computed again. Anything that changes the cache forgets the ids until the
owner remembers them again, so a forward cut short (Ctrl-C, an exception)
never leaves a prefix that is trusted.

*Several conversations.* A chat UI sends more than its conversation: a title,
tags or follow-up suggestions are asked for with other prompts after a reply,
and a user switches between chats. A :class:`DynamicKV` therefore keeps up to
:data:`CONVERSATIONS` caches: a prompt that does not continue the current one
gets its own (seeded with the prefix they share), the current one is kept
aside, and a later prompt that continues a kept one takes it back. Those kept
aside hold at most :data:`ASIDE_MEMORY` of the RAM (a large model's long
chats would otherwise take gigabytes the user did not plan for).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .hardware import ram


@dataclass
class Forward:
    """Output of one :meth:`KVCache.forward`.

    Attributes:
        logits: ``[keep, V]``, the last ``keep`` rows.
        hidden: ``[keep, H]`` final hidden states of those rows, when asked for.
        captured: seconds spent capturing a CUDA graph (or compiling the step) in this call (one-time work).
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    captured: float = 0.0


class KVCache:
    """The interface both cache kinds implement (see the module docstring).

    Attributes:
        length: positions cached.
        reuse: whether :meth:`start` keeps a remembered prefix (else every generation starts empty).
        known: ``[k]`` long, the token ids held at positions ``[0, k)`` when the owner last said so
            (:meth:`remember`), else None.
    """

    length: int
    reuse: bool = True
    known: torch.Tensor | None = None

    def start(self, capacity: int, tokens: Sequence[int] = ()) -> int:
        """Start a generation over ``tokens`` that will hold at most ``capacity`` positions.

        Keeps the cached positions of the longest common prefix of the remembered ids and
        ``tokens`` (at most ``len(tokens) - 1``, so that the last token is always fed) and
        returns how many were kept: the caller feeds ``tokens[kept:]``.
        """
        kept = 0
        if self.reuse and self.known is not None and len(tokens) > 1:
            kept = shared_prefix(self.known[: min(len(tokens) - 1, self.length)], tokens)
        self.known = None
        return self._restart(capacity, kept)

    def remember(self, ids: torch.Tensor) -> None:
        """Say that positions ``[0, len(ids))`` hold ``ids`` (``[k]`` long, ``k <= length``), for :meth:`start`."""
        self.known = ids[: self.length]

    def _restart(self, capacity: int, keep: int) -> int:
        """Empty the cache but for its first ``keep`` positions, with room for ``capacity``; return what was kept."""
        raise NotImplementedError

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
        keep: int = 1,
        hidden: bool = False,
    ) -> Forward:
        """Run the model over ``tokens`` (``[t]`` long) and cache their KV.

        Args:
            tokens: ``[t]`` new tokens.
            positions: ``[t]`` their positions (None = ``length + arange(t)``).
            allowed: ``[t, t]`` bool, which new rows each new row sees (None = causal).
            keep: rows (the last ones) whose logits are returned.
            hidden: also return their final hidden states.
        """
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Drop every cached position from ``length`` on."""
        raise NotImplementedError

    def keep_rows(self, start: int, rows: list[int]) -> None:
        """Keep positions ``[0, start)`` plus ``start + r`` for ``r`` in ``rows`` (in that order).

        ``rows`` that form a prefix ``0..k-1`` reduce to a crop.
        """
        if rows == list(range(len(rows))):
            self.truncate(start + len(rows))
            return
        self._gather(start, rows)

    def _gather(self, start: int, rows: list[int]) -> None:
        raise NotImplementedError


def shared_prefix(known: torch.Tensor, tokens: Sequence[int]) -> int:
    """Length of the longest common prefix of ``known`` (``[k]`` long) and ``tokens``."""
    n = min(int(known.numel()), len(tokens))
    same = known[:n].cpu() == torch.as_tensor(list(tokens[:n]), dtype=known.dtype)
    return n if bool(same.all()) else int(same.to(torch.uint8).argmin())


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes the cache: ``cache`` (transformers >= 5.2x)
    or ``past_key_values`` (earlier 5.x, e.g. the version text-generation-webui pins).
    Passing the wrong one silently runs without a cache there, so it is looked up once."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache for ``model``."""
    return DynamicCache(config=model.config)


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def truncate(cache: DynamicCache, length: int) -> None:
    """Drop every cached position of a ``DynamicCache`` from ``length`` on."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def tree_mask(
    allowed: torch.Tensor | None,
    t: int,
    length: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The additive 4D mask ``[1, 1, t, width]`` of ``t`` new rows written at ``[length, length + t)``.

    Columns ``[0, length)`` (the cache) are visible to every row, columns of the
    new rows follow ``allowed`` (``[t, t]`` bool, None = causal), the rest are hidden.
    """
    full = torch.zeros(t, width, dtype=torch.bool, device=device)
    full[:, :length] = True
    new = allowed.to(device) if allowed is not None else torch.ones(t, t, dtype=torch.bool, device=device).tril()
    full[:, length : length + t] = new
    mask = torch.zeros(t, width, dtype=dtype, device=device).masked_fill_(~full, torch.finfo(dtype).min)
    return mask[None, None]


def run_model(
    model: torch.nn.Module,
    cache_arg: str,
    cache,
    tokens: torch.Tensor,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
    keep: int,
    hidden: bool,
) -> Forward:
    """One eager forward of ``tokens`` (``[t]``, on the model's device) on ``cache``; the last ``keep`` rows'
    logits ``[keep, V]`` (and final hidden states ``[keep, H]``). ``positions``: ``[t]`` or None (transformers'
    own, after the cache); ``mask``: ``[1, 1, t, width]`` additive or None (causal)."""
    out = model(
        input_ids=tokens[None],
        position_ids=None if positions is None else positions[None],
        attention_mask=mask,
        use_cache=True,
        output_hidden_states=hidden,
        logits_to_keep=keep,
        **{cache_arg: cache},
    )
    return Forward(out.logits[0, -keep:], out.hidden_states[-1][0, -keep:] if hidden else None)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its first floating parameter's; float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


CONVERSATIONS = 4
"""Conversations whose KV cache a :class:`DynamicKV` on a CPU keeps (the current one and those kept aside).
On an accelerator it keeps one: its memory is scarce and computing a prompt again is fast there."""

ASIDE_MEMORY = 0.25
"""Share of the RAM that would be available without them that one model's caches kept aside may hold (a 7B model
holds ~56 KiB a position: three kept 8k-token conversations would be ~1.3 GiB)."""


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of memory the cache's keys and values hold (a cropped layer still holds its whole storage)."""
    storages = {
        id(t): t.untyped_storage().nbytes()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


class DynamicKV(KVCache):
    """A growing ``DynamicCache``: the eager path, and the default on CPUs.

    Attributes:
        aside: caches of other conversations, ``(cache, length, known)``, least recently used first.
        conversations: how many conversations it keeps (:data:`CONVERSATIONS` on a CPU, else 1).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache_arg = cache_argument(model)
        self.device = next(model.parameters()).device
        self.dtype = model_dtype(model)
        self.cache = new_cache(model)
        self.length = 0
        self.aside: list[tuple[DynamicCache, int, torch.Tensor]] = []
        self.conversations = CONVERSATIONS if self.device.type == "cpu" else 1
        self.prompt_length = 0  # of the generation the current cache last started

    def start(self, capacity: int, tokens: Sequence[int] = ()) -> int:
        if self.reuse and len(tokens) > 1:
            self._switch(tokens)
        self.prompt_length = len(tokens)
        return super().start(capacity, tokens)

    def _switch(self, tokens: Sequence[int]) -> None:
        """Make current the kept cache that ``tokens`` continue best; a prompt that continues none (departs
        from the current one within its last prompt: another chat, even one under the same system prompt,
        or an edited message) gets a new cache holding the shared prefix, and the current one is kept
        aside. A prompt that holds the whole last prompt (the next turn, a regenerated reply) goes on in
        the current cache. At most ``conversations`` caches are kept; the least recently used goes."""

        def shared(known: torch.Tensor | None, length: int) -> int:
            return 0 if known is None else shared_prefix(known[: min(len(tokens) - 1, length)], tokens)

        mine = shared(self.known, self.length)
        scores = [shared(known, length) for _, length, known in self.aside]
        best = max(range(len(scores)), key=scores.__getitem__, default=None)
        if best is not None and scores[best] > mine:
            taken = self.aside.pop(best)
            self._set_aside()
            self.cache, self.length, self.known = taken
        elif self.known is not None and mine < min(self.prompt_length - 1, self.known.numel()):
            prefix = new_cache(self.model)
            if mine:
                for i, layer in enumerate(self.cache.layers):
                    prefix.update(layer.keys[..., :mine, :].clone(), layer.values[..., :mine, :].clone(), i)
            known = self.known[:mine]
            self._set_aside()
            self.cache, self.length, self.known = prefix, mine, known

    def _set_aside(self) -> None:
        """Keep the current cache aside when it holds a conversation (its ids are known), dropping the least
        recently used beyond ``conversations`` or while those kept aside hold more than :data:`ASIDE_MEMORY`
        of the RAM that would be available without them; the caller then makes another cache current."""
        if self.known is None or self.length == 0:
            return
        self.aside.append((self.cache, self.length, self.known))
        del self.aside[: max(0, len(self.aside) - (self.conversations - 1))]
        sizes = [cache_bytes(cache) for cache, _, _ in self.aside]
        _, available = ram()
        if available:  # unknown (0): bounded by the count alone
            budget = ASIDE_MEMORY * (available + sum(sizes))
            while self.aside and sum(sizes) > budget:
                del self.aside[0], sizes[0]

    def _restart(self, capacity: int, keep: int) -> int:
        if keep > 0:
            self.truncate(keep)
        else:
            self.cache = new_cache(self.model)
            self.length = 0
        return self.length

    def forward(self, tokens, positions=None, allowed=None, keep=1, hidden=False) -> Forward:
        self.known = None
        t = int(tokens.numel())
        tokens, mask = tokens.to(self.device), None
        if allowed is not None or positions is not None:  # a tree or extra rows; else transformers' causal mask
            if positions is None:
                positions = torch.arange(self.length, self.length + t, device=self.device)
            positions = positions.to(self.device)
            mask = tree_mask(allowed, t, self.length, self.length + t, self.dtype, self.device)
        out = run_model(self.model, self.cache_arg, self.cache, tokens, positions, mask, keep, hidden)
        self.length += t
        return out

    def truncate(self, length: int) -> None:
        self.known = None
        truncate(self.cache, length)
        self.length = min(self.length, length)

    def _gather(self, start: int, rows: list[int]) -> None:
        self.known = None
        for layer in self.cache.layers:
            idx = torch.tensor([start + r for r in rows], device=layer.keys.device)
            layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, idx)], dim=-2)
            layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, idx)], dim=-2)
        self.length = start + len(rows)
