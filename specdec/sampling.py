"""Sampling configuration and the logits processing shared by target and draft.

Lossless speculative sampling requires that the target and every proposer
apply exactly the same transformation to their logits, each position with its
own prefix. The order is that of transformers' ``generate``: repetition
penalty, then temperature, top-k and top-p.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidSamplingError
from .modelinfo import embedding_rows


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()  # never generated (e.g. a banned EOS)

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or not (0.0 <= self.temperature < math.inf):
            raise InvalidSamplingError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}",
                "use 0 for greedy decoding, e.g. 0.7 for sampling",
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise InvalidSamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}", "use 0 to disable top-k")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {self.top_p!r}", "use 1.0 to disable top-p")
        if not _is_real(self.repetition_penalty) or not (0.0 < self.repetition_penalty < math.inf):
            raise InvalidSamplingError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}",
                "use 1.0 to disable it",
            )
        bad = [t for t in self.suppress_tokens if not is_int(t) or t < 0]
        if bad:
            raise InvalidSamplingError(
                f"suppress_tokens must be token ids (integers >= 0), got {bad[0]!r}",
                "token ids must be in [0, vocabulary size)",
            )
        object.__setattr__(self, "suppress_tokens", tuple(int(t) for t in self.suppress_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_prefix(self) -> bool:
        """Whether processing depends on the tokens before each position."""
        return self.repetition_penalty != 1.0


def is_int(value: Any) -> bool:
    """An integer (Python, numpy...), not a bool nor a float such as 5.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (NaN and inf pass here; the range checks refuse them)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds ``torch.Generator.manual_seed`` takes."""


def check_request(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: Any,
    temperature: Any = 0.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    repetition_penalty: Any = 1.0,
    suppress_tokens: Any = (),
    stop: Any = None,
    seed: Any = None,
    eos_token_id: Any = None,
) -> tuple[SamplingConfig, list[str], set[int] | None]:
    """Check the values of one generation call; return its sampling config, its stop strings and the
    EOS ids it gave (None when it gave none: the model's apply).

    Every value is checked before anything runs (an out-of-range token id
    would otherwise index out of bounds in an embedding, which on CUDA kills
    the process's GPU context).

    Args:
        model: the target; its input embedding rows bound the prompt ids and
            its output rows ``V`` bound ``suppress_tokens`` and ``eos_token_id``.
        prompt_ids: the encoded prompt.
        max_new_tokens, temperature, top_k, top_p, repetition_penalty,
        suppress_tokens, stop, seed, eos_token_id: as given to :meth:`SpeculativeGenerator.stream`.

    Raises:
        InvalidSamplingError: naming the argument and the value.
    """
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise InvalidSamplingError(
            f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}",
            "pass a whole number of tokens, e.g. max_new_tokens=128",
        )
    if seed is not None and (not is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
        raise InvalidSamplingError(
            f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (a 64-bit seed), got {seed!r}",
            "use a smaller whole number, e.g. 0, or no seed for a random one",
        )
    if isinstance(suppress_tokens, (str, bytes)) or not isinstance(suppress_tokens, Iterable):
        raise InvalidSamplingError(
            f"suppress_tokens must be a list of token ids, got {suppress_tokens!r}",
            "e.g. suppress_tokens=[tokenizer.eos_token_id]",
        )
    cfg = SamplingConfig(temperature, top_k, top_p, repetition_penalty, tuple(suppress_tokens))
    vocab_out = embedding_rows(model.get_output_embeddings())
    if vocab_out is not None and any(t >= vocab_out for t in cfg.suppress_tokens):
        raise InvalidSamplingError(
            f"suppress_tokens has id {max(cfg.suppress_tokens)}, outside the target's vocabulary of {vocab_out}",
            "token ids must be in [0, vocabulary size)",
        )
    if vocab_out is not None and len(set(cfg.suppress_tokens)) >= vocab_out:
        raise InvalidSamplingError(
            f"suppress_tokens holds all {vocab_out} tokens of the vocabulary: nothing could be generated",
            "suppress only the tokens that must never appear",
        )
    eos = None if eos_token_id is None else _eos_ids(eos_token_id, vocab_out)
    if stop is None or isinstance(stop, str):
        stops = [stop] if stop else []
    elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidSamplingError(
            f"stop must be a string or a list of strings, got {stop!r}", 'e.g. stop="\\n\\n" or stop=["User:", "###"]'
        )
    vocab_in = embedding_rows(model.get_input_embeddings())
    if vocab_in is not None and prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= vocab_in):
        worst = min(prompt_ids) if min(prompt_ids) < 0 else max(prompt_ids)
        raise InvalidSamplingError(
            f"the prompt has token id {worst}, outside the target's vocabulary of {vocab_in}",
            "prompt token ids must be in [0, vocabulary size)",
        )
    return cfg, stops, eos


def _eos_ids(eos_token_id: Any, vocab_out: int | None) -> set[int]:
    """The EOS ids a caller gave (one id or several), each checked to be a token id below ``vocab_out``."""
    if isinstance(eos_token_id, (str, bytes)):
        raise InvalidSamplingError(
            f"eos_token_id takes token ids, not text ({eos_token_id!r})",
            f"give the token's id, e.g. tokenizer.convert_tokens_to_ids({eos_token_id!r}), or a stop string (stop=)",
        )
    ids = [eos_token_id] if is_int(eos_token_id) or not isinstance(eos_token_id, Iterable) else list(eos_token_id)
    bad = [i for i in ids if not is_int(i) or i < 0 or (vocab_out is not None and i >= vocab_out)]
    if bad:
        raise InvalidSamplingError(
            f"eos_token_id has {bad[0]!r}, not a token id of the target's vocabulary of {vocab_out}",
            "give token ids in [0, vocabulary size), or [] to never stop at EOS",
        )
    return {int(i) for i in ids}


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
