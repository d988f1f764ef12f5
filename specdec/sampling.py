"""Sampling configuration and the logits processing shared by target and draft.

Lossless speculative sampling requires that the target and every proposer
apply exactly the same transformation to their logits, each position with its
own prefix. The order is that of transformers' ``generate``: repetition
penalty, then temperature, top-k and top-p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidSamplingError


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()  # never generated (e.g. a banned EOS)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise InvalidSamplingError(
                f"temperature must be >= 0, got {self.temperature}", "use 0 for greedy decoding, e.g. 0.7 for sampling"
            )
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise InvalidSamplingError(f"top_k must be an integer >= 0, got {self.top_k}", "use 0 to disable top-k")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {self.top_p}", "use 1.0 to disable top-p")
        if not (self.repetition_penalty > 0.0):
            raise InvalidSamplingError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", "use 1.0 to disable it"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_prefix(self) -> bool:
        """Whether processing depends on the tokens before each position."""
        return self.repetition_penalty != 1.0


def presence_rows(context: torch.Tensor, vocab_size: int, path_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Which tokens occur in each position's prefix, for the repetition penalty.

    Args:
        context: ``[L]`` committed token ids (the shared prefix of every row).
        vocab_size: ``V``.
        path_tokens: ``[n, d]`` for each row, the extra tokens on its own path
            after the committed context (padded with ``-1``), or ``None``.

    Returns:
        ``[n, V]`` (or ``[1, V]`` when ``path_tokens`` is None) bool.
    """
    base = torch.zeros(vocab_size, dtype=torch.bool, device=context.device)
    base[context[context < vocab_size]] = True
    if path_tokens is None:
        return base.unsqueeze(0)
    rows = base.unsqueeze(0).repeat(path_tokens.shape[0], 1)
    valid = (path_tokens >= 0) & (path_tokens < vocab_size)
    r, c = valid.nonzero(as_tuple=True)
    rows[r, path_tokens[r, c]] = True
    return rows


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, presence: torch.Tensor | None = None) -> torch.Tensor:
    """Apply repetition penalty and temperature/top-k/top-p.

    Args:
        logits: ``[n, V]`` raw logits, any float dtype.
        cfg: the sampling configuration.
        presence: ``[n, V]`` or ``[1, V]`` bool, tokens already in each row's
            prefix (needed only when ``cfg.repetition_penalty != 1``).

    Returns:
        ``[n, V]`` float32: processed logits when ``cfg.greedy`` (argmax of them
        is the greedy token), else probabilities summing to 1 per row.
    """
    x = logits.float()
    if cfg.suppress_tokens:
        x = x.clone()
        x[..., [t for t in cfg.suppress_tokens if t < x.shape[-1]]] = float("-inf")
    if cfg.repetition_penalty != 1.0 and presence is not None:
        penalised = torch.where(x > 0, x / cfg.repetition_penalty, x * cfg.repetition_penalty)
        x = torch.where(presence, penalised, x)
    if cfg.greedy:
        return x
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1.0 - cfg.top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(dim=-1)


def choose(processed: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from :func:`process_logits` output.

    Args:
        processed: ``[n, V]``.
    Returns:
        ``[n]`` long.
    """
    if cfg.greedy:
        return processed.argmax(dim=-1)
    return torch.multinomial(processed, 1, generator=generator).squeeze(-1)
