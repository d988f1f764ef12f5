"""Self-distillation of Medusa heads, cheap enough for a CPU.

The target stays frozen. Steps:

1. *Windows*: documents are shuffled (seeded) and one window of
   ``seq_len`` tokens is cut from each (optionally after a chat-template
   prefix, so the hidden states look like an assistant's answer).
2. *Cache*: one target forward per window gives the final hidden state
   ``h_t`` and the target's own greedy prediction ``g_t = argmax lm_head(h_t)``
   at every position. This is the only expensive part; it is stored in
   ``OUT/cache`` so a resumed run skips it.
3. *Train*: head ``k`` at position ``t`` learns ``g_{t+1+k}``, the token the
   target itself predicts ``k + 2`` positions after ``t`` (self-distillation:
   acceptance tracks the target, not the corpus). ``g_{t+1+k}`` is read in
   the corpus' context, which is the target's own continuation after ``t`` only
   while the corpus agrees with the target's predictions; with
   ``exact_labels`` a head learns only where it does. Each step samples
   ``batch_size`` cached positions; the heads' output may be restricted to the
   ``subset_size`` tokens the target predicts most often, which makes a step
   ~10x cheaper and leaves verification exact. Loss = sum over heads of
   ``distance_decay**k * cross_entropy``; AdamW with warmup + cosine schedule.
4. *Evaluate*: per-head, per-rank accuracy on held-out windows, then the
   tree that maximises expected tokens per unit of forward cost (measured on
   the target) is stored with the heads.

With ``answers`` the target also answers instructions made from the corpus
(:mod:`specdec.medusa.distill`, cached in ``OUT/answers``): windows of its own
answers, where every label is exact and the text is what decoding continues
in a chat UI. They are trained on beside the corpus windows, and their
held-out part sizes the tree.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..costs import measure_row_cost, row_cost
from ..errors import SpecdecError
from ..files import atomic_path, write_atomic
from ..modelinfo import decoder_body, eos_token_ids, model_context_length, output_rows
from .distill import ENDED
from .heads import DEFAULT_NUM_HEADS, DEFAULT_NUM_LAYERS, MedusaHeads, target_fingerprint
from .choices import tree_from_accuracies

CACHE_DIR = "cache"
ANSWERS_DIR = "answers"
ANSWER_SAVE_BATCHES = 4  # batches of answers between saves of OUT/answers
CHECKPOINT_DIR = "checkpoint"
CHAT_INSTRUCTION = "Write some Python code."
EVAL_RANKS = 10


@dataclass
class TrainConfig:
    """Options of :func:`train` (the CLI's defaults come from here).

    Attributes:
        num_heads: heads to train.
        num_layers: residual blocks per head.
        steps: optimiser steps.
        seq_len: tokens per window.
        lr: peak learning rate (AdamW).
        batch_size: positions per step.
        cache_tokens: positions whose hidden states are computed and cached.
        subset_size: restrict head outputs to this many most-predicted tokens (0 = whole vocabulary).
        distance_decay: loss weight of head ``k`` is ``distance_decay**k``.
        warmup_steps: linear warmup before the cosine decay.
        weight_decay: AdamW weight decay.
        eval_fraction: share of windows held out for the accuracy measurement.
        seed: seeds window choice, sampling of positions and initialisation.
        checkpoint_every: steps between checkpoints (0 = only at the end).
        own_lm_head: train a projection per head instead of sharing the target's lm_head.
        chat_wrap: put each window in the assistant turn of the chat template (if any).
        max_docs: most documents read from the data (None = all).
        measure_cost: time target forwards of several sizes to size the tree.
        max_tree_nodes: largest tree considered.
        cache_save_every: windows between saves of the cache while it is computed (0 = only at the end).
        exact_labels: train head ``k`` at position ``t`` only where the corpus tokens
            ``t+1 .. t+1+k`` equal the target's greedy predictions, so its label is exactly
            the target's own greedy continuation (see :func:`exact_label_mask`).
        answers: instructions made from the data that the target answers greedily
            (:mod:`specdec.medusa.distill`); their ``seq_len``-token answers are trained on
            beside the corpus windows (every label exact) and the held-out answers
            size the tree, since decoding continues answers. 0 = corpus windows only.
        answer_batch: answers computed together in one batched forward per token.
        sequential: each head also reads the token before its guess (Hydra-style heads,
            :class:`~specdec.medusa.heads.MedusaHeads`), trained on the target's own tokens.
    """

    num_heads: int = DEFAULT_NUM_HEADS
    num_layers: int = DEFAULT_NUM_LAYERS
    steps: int = 600
    seq_len: int = 256
    lr: float = 1e-3
    batch_size: int = 256
    cache_tokens: int = 32768
    subset_size: int = 16384
    distance_decay: float = 0.8
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100
    own_lm_head: bool = False
    chat_wrap: bool = True
    max_docs: int | None = None
    measure_cost: bool = True
    max_tree_nodes: int = 64
    cache_save_every: int = 32
    exact_labels: bool = False
    answers: int = 0
    answer_batch: int = 32
    sequential: bool = False

    def __post_init__(self) -> None:
        checks = {
            "num_heads": self.num_heads >= 1,
            "num_layers": self.num_layers >= 1,
            "steps": self.steps >= 1,
            "seq_len": self.seq_len >= self.num_heads + 4,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "cache_tokens": self.cache_tokens >= self.seq_len,
            "subset_size": self.subset_size >= 0,
            "distance_decay": 0 < self.distance_decay <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "eval_fraction": 0 <= self.eval_fraction < 1,
            "checkpoint_every": self.checkpoint_every >= 0,
            "max_tree_nodes": self.max_tree_nodes >= 1,
            "cache_save_every": self.cache_save_every >= 0,
            "answers": self.answers >= 0,
            "answer_batch": self.answer_batch >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise SpecdecError(
                f"invalid training option(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}",
                "seq_len must exceed num_heads + 3 and cache_tokens be at least seq_len",
            )


@dataclass
class Progress:
    """What a progress callback receives after each step (or during the cache phase)."""

    phase: str  # "cache", "train" or "eval"
    done: int
    total: int
    loss: float | None = None
    head_acc: list[float] | None = None
    lr: float | None = None


ProgressFn = Callable[[Progress], None]


# ---------------------------------------------------------------------- windows
def chat_prefix(tokenizer: Any) -> list[int]:
    """Token ids that open an assistant answer to :data:`CHAT_INSTRUCTION` (``[]`` without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_INSTRUCTION}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_windows(texts: list[str], tokenizer: Any, cfg: TrainConfig, prefix: list[int]) -> torch.Tensor:
    """``[N, seq_len]`` long: one random window per shuffled document (prefix first).

    Documents too short for a full window are concatenated with the next ones.
    """
    body = cfg.seq_len - len(prefix)
    if body < cfg.num_heads + 4:
        raise SpecdecError(
            f"seq_len {cfg.seq_len} is too short for the chat prefix of {len(prefix)} tokens",
            "raise --seq-len or pass --no-chat-wrap",
        )
    need = math.ceil(cfg.cache_tokens / cfg.seq_len)
    rng = random.Random(cfg.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    windows: list[list[int]] = []
    carry: list[int] = []
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    for i in order:
        if len(windows) >= need:
            break
        ids = carry + list(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if len(ids) < body:
            carry = ids + sep
            continue
        carry = []
        start = rng.randrange(0, len(ids) - body + 1)
        windows.append(prefix + ids[start : start + body])
    if not windows:
        raise SpecdecError(
            "the training data holds too little text for one window",
            f"give more text or lower --seq-len (now {cfg.seq_len})",
        )
    return torch.tensor(windows, dtype=torch.long)


# ---------------------------------------------------------------------- cache
@torch.inference_mode()
def collect_features(
    target: torch.nn.Module, windows: torch.Tensor, progress: ProgressFn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target hidden states and greedy predictions of every window.

    Args:
        windows: ``[N, L]`` token ids.
    Returns:
        ``hidden [N, L, H]`` (target dtype, final post-norm hidden states) and
        ``preds [N, L]`` int32, ``preds[:, t] = argmax lm_head(hidden[:, t])``.
    """
    body, lm_head = decoder_body(target), target.get_output_embeddings()
    device = next(target.parameters()).device
    hiddens, preds = [], []
    for i, w in enumerate(windows):
        h = body(input_ids=w[None].to(device)).last_hidden_state[0]  # [L, H]
        preds.append(lm_head(h).argmax(-1).to(torch.int32).cpu())
        hiddens.append(h.cpu())
        if progress:
            progress(Progress("cache", i + 1, len(windows)))
    return torch.stack(hiddens), torch.stack(preds)


Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [N, L, H], preds [N, L], tokens [N, L]


def _cache_meta(target: torch.nn.Module, cfg: TrainConfig, data: str) -> dict[str, Any]:
    """What a cache must match to be reused (its size may differ: windows are a seeded prefix order)."""
    return {
        "data": str(data),
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "chat_wrap": cfg.chat_wrap,
        "max_docs": cfg.max_docs,
        "fingerprint": target_fingerprint(target),
        "dtype": str(next(target.parameters()).dtype),
    }


def cached_rows(
    cache: Path,
    meta: dict[str, Any],
    need: int,
    plan: Callable[[], int],
    compute: Callable[[int, int, ProgressFn], Features],
    chunk: int,
    phase: str = "cache",
    progress: ProgressFn | None = None,
) -> Features:
    """The first ``need`` rows of the feature cache in ``cache``, computing only the missing ones.

    Rows come in a fixed (seeded) order, so a cache made for fewer rows holds
    the first rows of a bigger request, and a bigger cache is cut to the
    request. ``plan()`` prepares the rows (reads the data) and returns how many
    exist; it is called only when the cache is short. ``compute(first, last,
    progress)`` gives rows ``first .. last - 1``. The cache is saved every
    ``chunk`` rows, so an interrupted run loses little.
    """
    have: Features | None = None
    if (cache / "meta.json").is_file() and (cache / "features.safetensors").is_file():
        saved = _read_json(cache / "meta.json", f"delete {cache} to compute it again")
        t = (
            _read_tensors(cache / "features.safetensors", f"delete {cache} to compute it again")
            if {k: saved.get(k) for k in meta} == meta
            else {}
        )
        if "tokens" in t:
            have = (t["hidden"], t["preds"], t["tokens"])
            if have[0].shape[0] >= need:
                return _cut(have, need)
    count = min(need, plan())
    done = 0 if have is None else have[0].shape[0]
    if have is not None and done >= count:  # cached all the data holds
        return _cut(have, count)
    parts = [] if have is None else [have]
    step = max(1, chunk)
    for first in range(done, count, step):
        last = min(first + step, count)

        def chunk_progress(p: Progress, offset: int = first - done) -> None:
            if progress:
                progress(Progress(phase, offset + p.done, count - done))

        parts.append(compute(first, last, chunk_progress))
        if last < count:
            _save_cache(cache, meta, parts)
    feats = _cat(parts)
    _save_cache(cache, meta, [feats])
    return feats


def _cut(feats: Features, n: int) -> Features:
    return feats[0][:n], feats[1][:n], feats[2][:n]


def _cat(parts: list[Features]) -> Features:
    return tuple(
        torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k]  # type: ignore[return-value]
        for k in range(3)
    )


def _save_cache(cache: Path, meta: dict[str, Any], parts: list[Features]) -> None:
    """Write ``cache/features.safetensors`` (hidden, preds, tokens), then ``meta.json``, each whole or not at all."""
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    hidden, preds, tokens = _cat(parts)
    tensors = {
        "hidden": hidden.contiguous(),
        "preds": preds.contiguous(),
        "tokens": tokens.to(torch.int32).contiguous(),
    }
    with atomic_path(cache / "features.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_atomic(cache / "meta.json", json.dumps({**meta, "windows": int(hidden.shape[0])}))


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    """A JSON object from ``path``; a damaged file is a :class:`SpecdecError` naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecdecError(f"{path} is unreadable ({type(e).__name__}: {e})", hint) from None
    if not isinstance(data, dict):
        raise SpecdecError(f"{path} is not a JSON object", hint)
    return data


def _read_tensors(path: Path, hint: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt one is a :class:`SpecdecError` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (truncated, bad header) or OSError
        raise SpecdecError(f"{path} is unreadable ({type(e).__name__}: {e})", hint) from None


def _documents(data: str | Path, cfg: TrainConfig) -> list[str]:
    """The corpus' documents, the first ``cfg.max_docs`` of them if set."""
    from .data import read_corpus

    texts = read_corpus(data)
    return texts[: cfg.max_docs] if cfg.max_docs else texts


def load_or_collect(
    target: torch.nn.Module,
    tokenizer: Any,
    data: str | Path,
    cfg: TrainConfig,
    out: Path,
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """``(hidden [N, L, H], preds [N, L], first usable position, tokens [N, L])``, reusing ``out/cache``.

    ``tokens`` are the windows' own (corpus) token ids; see :func:`cached_rows`
    for what is reused (the cache is saved every ``cfg.cache_save_every`` windows).
    """
    prefix = chat_prefix(tokenizer) if cfg.chat_wrap else []
    start = max(len(prefix) - 1, 0)
    meta = {**_cache_meta(target, cfg, str(data)), "start": start}
    windows: list[torch.Tensor] = []

    def plan() -> int:
        windows.append(make_windows(_documents(data, cfg), tokenizer, cfg, prefix))
        return windows[0].shape[0]

    def compute(first: int, last: int, prog: ProgressFn) -> Features:
        h, p = collect_features(target, windows[0][first:last], prog)
        return h, p, windows[0][first:last]

    need = math.ceil(cfg.cache_tokens / cfg.seq_len)
    hidden, preds, tokens = cached_rows(
        out / CACHE_DIR, meta, need, plan, compute, cfg.cache_save_every or need, "cache", progress
    )
    return hidden, preds, start, tokens.long()


def load_or_answer(
    target: torch.nn.Module,
    tokenizer: Any,
    data: str | Path,
    cfg: TrainConfig,
    out: Path,
    progress: ProgressFn | None = None,
) -> Features:
    """The target's own answers to ``cfg.answers`` instructions made from ``data``, reusing ``out/answers``.

    See :mod:`specdec.medusa.distill`. Returns ``(hidden [N, L, H], preds [N, L],
    tokens [N, L])`` with ``L = cfg.seq_len``, first usable position 0, and
    ``tokens`` = :data:`~specdec.medusa.distill.ENDED` after an answer's end.
    """
    from .distill import MAX_PROMPT_TOKENS, answer_features, instruction_prompts, instructions_from_texts

    meta = {**_cache_meta(target, cfg, str(data)), "kind": "answers"}
    prompts: list[list[int]] = []

    def plan() -> int:
        made = instructions_from_texts(_documents(data, cfg), 2 * cfg.answers, cfg.seed)
        limit = min(MAX_PROMPT_TOKENS, model_context_length(target) - cfg.seq_len)
        prompts.extend(instruction_prompts(tokenizer, made, cfg.answers, limit))
        if not prompts:
            raise SpecdecError(
                f"no instruction of at most {limit} tokens could be made from {data}",
                "give Python source or prose documents, or train without --answers",
            )
        return len(prompts)

    def compute(first: int, last: int, prog: ProgressFn) -> Features:
        return answer_features(
            target,
            prompts[first:last],
            cfg.seq_len,
            cfg.answer_batch,
            eos_token_ids(target, tokenizer),
            progress=lambda done, total: prog(Progress("answers", done, total)),
        )

    return cached_rows(
        out / ANSWERS_DIR, meta, cfg.answers, plan, compute, ANSWER_SAVE_BATCHES * cfg.answer_batch, "answers", progress
    )


# ---------------------------------------------------------------------- training
def frequent_tokens(preds: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor | None:
    """``[size]`` the ``size`` token ids the target predicts most often (None if ``size`` is 0 or >= V)."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.bincount(preds.flatten().long(), minlength=vocab_size)
    return counts.topk(size).indices.sort().values


def head_labels(preds: torch.Tensor, num_heads: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and labels of every head.

    Args:
        preds: ``[N, L]`` target predictions.
    Returns:
        ``positions [P, 2]`` (window, t) and ``labels [P, K]`` token ids:
        ``labels[p, k] = preds[n, t + 1 + k]``.
    """
    n, length = preds.shape
    ts = torch.arange(start, length - num_heads)
    pos = torch.stack(torch.meshgrid(torch.arange(n), ts, indexing="ij"), dim=-1).reshape(-1, 2)
    return pos, _ahead(preds, pos, 1, num_heads)


def head_inputs(preds: torch.Tensor, pos: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[P, K]`` the token before each head's guess: ``prev[p, k] = preds[n, t + k]``.

    Sequential heads read it: head ``k`` guesses ``preds[t + 1 + k]`` after the
    target's own tokens ``preds[t] .. preds[t + k]`` (``preds[t]`` is the tree's root).
    """
    return _ahead(preds, pos, 0, num_heads)


def _ahead(preds: torch.Tensor, pos: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """``[P, count]`` long: ``preds[n, t + first + k]`` for ``k < count`` at each position (n, t)."""
    return torch.stack([preds[pos[:, 0], pos[:, 1] + first + k] for k in range(count)], dim=-1).long()


def exact_label_mask(preds: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[P, K]`` bool: where ``labels[p, k]`` is exactly the target's greedy continuation.

    The target, run greedily from position ``t``, emits ``g_t`` and then, in
    context ``x_{<=t}, g_t``, its next prediction, and so on. ``preds[t+1+k]`` was
    computed in the corpus' context ``x_{<=t+1+k}``, which equals that greedy
    context while ``x_{t+1+j} == g_{t+j}`` for ``j = 0 .. k``.

    Args:
        preds: ``[N, L]`` target predictions ``g``; tokens: ``[N, L]`` the corpus windows ``x``;
        pos: ``[P, 2]`` (window, t) with ``t + num_heads < L``.
    """
    agree = torch.zeros_like(tokens, dtype=torch.bool)
    agree[:, :-1] = tokens[:, 1:].long() == preds[:, :-1].long()  # agree[t]: x_{t+1} == g_t
    steps = torch.stack([agree[pos[:, 0], pos[:, 1] + j] for j in range(num_heads)], dim=-1)  # [P, K]
    return steps.long().cumprod(-1).bool()


def to_subset(labels: torch.Tensor, subset: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Map token ids to indices of the head vocabulary; ids outside it become -100 (ignored)."""
    if subset is None:
        return labels
    lookup = torch.full((vocab_size,), -100, dtype=torch.long)
    lookup[subset] = torch.arange(subset.numel())
    return lookup[labels]


def medusa_loss(logits: torch.Tensor, labels: torch.Tensor, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance-weighted cross entropy.

    Args:
        logits: ``[B, K, V']`` head logits.
        labels: ``[B, K]`` indices into the head vocabulary (-100 = no valid label).
    Returns:
        ``(loss, top1 [K])``: the weighted mean loss and each head's top-1 accuracy
        (an ignored label counts as a miss).
    """
    k = logits.shape[1]
    weights = torch.tensor([decay**i for i in range(k)], device=logits.device)
    losses = torch.stack([F.cross_entropy(logits[:, i].float(), labels[:, i], ignore_index=-100) for i in range(k)])
    losses = torch.nan_to_num(losses)  # a head whose labels are all ignored
    top1 = (logits.argmax(-1) == labels).float().mean(0)
    return (losses * weights).sum() / weights.sum(), top1


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate multiplier: linear warmup, then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def rank_accuracy(
    heads: MedusaHeads,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ranks: int = EVAL_RANKS,
    batch: int = 512,
    valid: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
) -> list[list[float]]:
    """``[K][ranks]`` share of positions where head ``k``'s rank-``r`` candidate is the label.

    Args:
        hidden: ``[P, H]``; labels: ``[P, K]`` token ids.
        prev: ``[P, K]`` tokens before each guess (:func:`head_inputs`; read by sequential heads only).
        valid: ``[P, K]`` bool, which labels count (None = all); each head's share is
            over its own valid positions.
    """
    device = next(heads.parameters()).device  # the cached states stay on the CPU; each batch goes to the heads
    hits = torch.zeros(heads.num_heads, ranks)
    counts = torch.zeros(heads.num_heads)
    for i in range(0, hidden.shape[0], batch):
        before = None if prev is None else prev[i : i + batch].to(device)
        logits = heads(hidden[i : i + batch].to(device).float(), before)  # [b, K, V']
        top = heads.to_vocab(logits.topk(min(ranks, logits.shape[-1]), dim=-1).indices).cpu()  # [b, K, r]
        hit = (top == labels[i : i + batch, :, None]).float()  # [b, K, r]
        if valid is not None:
            hit = hit * valid[i : i + batch, :, None].float()
            counts += valid[i : i + batch].float().sum(0)
        else:
            counts += hit.shape[0]
        hits[:, : top.shape[-1]] += hit.sum(0)
    return (hits / counts.clamp_min(1)[:, None]).tolist()


@dataclass
class Positions:
    """Training or held-out positions of one source.

    Attributes:
        pos: ``[P, 2]`` (window, t), window indices counted in the concatenated hidden states.
        labels: ``[P, K]`` token ids (:func:`head_labels`).
        prev: ``[P, K]`` tokens before each head's guess (:func:`head_inputs`).
        exact: ``[P, K]`` bool (:func:`exact_label_mask`).
        windows: index one past the last window of this split (in the concatenated hidden states).
    """

    pos: torch.Tensor
    labels: torch.Tensor
    prev: torch.Tensor
    exact: torch.Tensor
    windows: int


def split_positions(
    preds: torch.Tensor, tokens: torch.Tensor, start: int, cfg: TrainConfig, offset: int = 0
) -> tuple[Positions, Positions]:
    """``(train, held_out)`` positions of one source: its last ``cfg.eval_fraction`` of windows are held out.

    Args:
        preds, tokens: ``[N, L]``; start: first usable position; offset: index of this
            source's first window among all windows.
    """
    n = preds.shape[0]
    n_eval = int(round(n * cfg.eval_fraction)) if n > 1 else 0
    out = []
    for lo, hi in ((0, n - n_eval), (n - n_eval, n)):
        pos, labels = head_labels(preds[lo:hi], cfg.num_heads, start)
        exact = exact_label_mask(preds[lo:hi], tokens[lo:hi], pos, cfg.num_heads)
        prev = head_inputs(preds[lo:hi], pos, cfg.num_heads)
        out.append(Positions(pos + torch.tensor([offset + lo, 0]), labels, prev, exact, offset + hi))
    return out[0], out[1]


def _save_checkpoint(heads: MedusaHeads, opt: torch.optim.Optimizer, step: int, out: Path, cfg: TrainConfig) -> None:
    """Write the heads, then the optimizer state and step, then the config into ``out/checkpoint``.

    Each file is written whole or not at all (temporary file + ``os.replace``),
    so a Ctrl-C during a save leaves the previous checkpoint readable.
    """
    ck = out / CHECKPOINT_DIR
    heads.save(ck)
    with atomic_path(ck / "train_state.pt") as tmp:
        torch.save({"step": step, "optimizer": opt.state_dict()}, tmp)
    write_atomic(ck / "train_config.json", json.dumps(asdict(cfg), indent=2))


def _read_train_state(ck: Path) -> dict[str, Any]:
    """The step and optimizer state of a checkpoint; a damaged file is a :class:`SpecdecError`."""
    file = ck / "train_state.pt"
    hint = f"train afresh with --overwrite instead of --resume, or delete {ck}"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, refused by weights_only
        raise SpecdecError(f"the checkpoint's training state {file} is unreadable ({type(e).__name__})", hint) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizer" not in state:
        raise SpecdecError(f"the checkpoint's training state {file} lacks its step or optimizer state", hint)
    return state


@dataclass
class Sources:
    """The cached target states and the positions read from them, corpus windows first, then answers.

    Attributes:
        hidden: ``[N, L, H]`` final hidden states: the corpus windows, then the answers (if any).
        corpus: ``(train, held_out)`` positions of the corpus windows.
        answers: ``(train, held_out)`` positions of the target's answers (None without ``cfg.answers``).
        train_preds: the target's predictions in the training windows, answers up to their end (the head
            vocabulary is drawn from them).
        corpus_windows, answer_windows: windows of each source.
        cache_seconds, answer_seconds: wall time to load or compute each source.
    """

    hidden: torch.Tensor
    corpus: tuple[Positions, Positions]
    answers: tuple[Positions, Positions] | None
    train_preds: torch.Tensor
    corpus_windows: int
    answer_windows: int
    cache_seconds: float
    answer_seconds: float

    @property
    def evaluated(self) -> tuple[Positions, Positions]:
        """The source the tree is sized on: the answers when there are some, since decoding continues answers."""
        return self.answers or self.corpus


def gather_sources(
    target: torch.nn.Module,
    tokenizer: Any,
    data: str | Path,
    cfg: TrainConfig,
    out: Path,
    progress: ProgressFn | None = None,
) -> Sources:
    """The corpus windows' states (``out/cache``) and, with ``cfg.answers``, the answers' (``out/answers``)."""
    t0 = time.perf_counter()
    hidden, preds, start, tokens = load_or_collect(target, tokenizer, data, cfg, out, progress)
    cache_seconds = time.perf_counter() - t0
    corpus = split_positions(preds, tokens, start, cfg)
    n_corpus = hidden.shape[0]
    if not cfg.answers:
        return Sources(hidden, corpus, None, preds[: corpus[0].windows], n_corpus, 0, cache_seconds, 0.0)
    t0 = time.perf_counter()
    a_hidden, a_preds, a_tokens = load_or_answer(target, tokenizer, data, cfg, out, progress)
    answer_seconds = time.perf_counter() - t0
    answers = split_positions(a_preds, a_tokens, 0, cfg, offset=n_corpus)
    a_train = answers[0].windows - n_corpus  # the subset counts answer tokens, not what follows an answer's end
    train_preds = torch.cat([preds[: corpus[0].windows].flatten(), a_preds[:a_train][a_tokens[:a_train] != ENDED]])
    return Sources(
        torch.cat([hidden, a_hidden]),
        corpus,
        answers,
        train_preds,
        n_corpus,
        int(a_hidden.shape[0]),
        cache_seconds,
        answer_seconds,
    )


@dataclass
class TrainingSet:
    """The positions training samples from.

    Attributes:
        pos: ``[P, 2]`` (window, t) in :attr:`Sources.hidden`.
        prev: ``[P, K]`` tokens before each head's guess.
        labels: ``[P, K]`` indices into the head vocabulary (-100 = not learnt: outside the subset, or not exact
            where only exact labels count).
        all_positions: positions before those that teach no head were dropped.
    """

    pos: torch.Tensor
    prev: torch.Tensor
    labels: torch.Tensor
    all_positions: int


def training_set(sources: Sources, subset: torch.Tensor | None, vocab: int, cfg: TrainConfig) -> TrainingSet:
    """The training positions of every source with their head-vocabulary labels.

    The corpus' labels count everywhere, or only where exact with ``cfg.exact_labels``; answers are the
    target's own text, so their labels are always exact (and none is read past an answer's end).
    """
    parts = [(sources.corpus[0], cfg.exact_labels)] + ([(sources.answers[0], True)] if sources.answers else [])
    pos = torch.cat([q.pos for q, _ in parts])
    labels = torch.cat([q.labels for q, _ in parts])
    prev = torch.cat([q.prev for q, _ in parts])
    exact = torch.cat([q.exact for q, _ in parts])
    exact_only = torch.cat([torch.full((q.pos.shape[0],), only) for q, only in parts])
    sub_labels = to_subset(labels, subset, vocab).masked_fill(~exact & exact_only[:, None], -100)
    keep = exact[:, 0] | ~exact_only  # a position whose first label is not exact teaches no head
    if not keep.any():
        raise SpecdecError(
            "no position where the corpus follows the target's own predictions",
            "train without exact_labels (--all-labels)",
        )
    return TrainingSet(pos[keep], prev[keep], sub_labels[keep], int(pos.shape[0]))


def start_heads(
    target: torch.nn.Module, cfg: TrainConfig, subset: torch.Tensor | None, out: Path, resume: bool
) -> tuple[MedusaHeads, torch.optim.Optimizer, int]:
    """Heads, optimizer and first step, from ``out/checkpoint`` when resuming from one, else fresh.

    ``resume`` without a checkpoint starts afresh (a first run with ``--resume`` is a plain run).
    """
    ck = out / CHECKPOINT_DIR
    state = None
    if resume and (ck / "train_state.pt").is_file():
        heads = MedusaHeads.from_pretrained(ck, target)  # a damaged config or weights file is a SpecdecError
        shape = (heads.config.num_heads, heads.config.num_layers, heads.config.sequential)
        if shape != (cfg.num_heads, cfg.num_layers, cfg.sequential):
            kinds = ("plain", "sequential")
            raise SpecdecError(
                f"the checkpoint in {ck} has {shape[0]} {kinds[shape[2]]} heads x {shape[1]} layers, "
                f"not {cfg.num_heads} {kinds[cfg.sequential]} x {cfg.num_layers}",
                "resume with the same --heads, --layers and --sequential",
            )
        state = _read_train_state(ck)
        if state["step"] >= cfg.steps:  # else the run would save the checkpoint's heads under this run's config
            raise SpecdecError(
                f"the checkpoint in {ck} is at step {state['step']}, at or past --steps {cfg.steps}: nothing to train",
                "give more --steps to go on training it, or --overwrite to train afresh",
            )
    else:
        heads = MedusaHeads.init(
            target,
            num_heads=cfg.num_heads,
            num_layers=cfg.num_layers,
            own_lm_head=cfg.own_lm_head,
            token_subset=subset,
            sequential=cfg.sequential,
        )
    heads.float().train()
    opt = torch.optim.AdamW(
        [p for p in heads.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    if state is None:
        return heads, opt, 0
    opt.load_state_dict(state["optimizer"])
    return heads, opt, int(state["step"])


def train_step(
    heads: MedusaHeads,
    opt: torch.optim.Optimizer,
    states: torch.Tensor,
    prev: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    decay: float,
) -> tuple[float, torch.Tensor]:
    """One AdamW step at learning rate ``lr``; returns the batch's loss and each head's top-1 accuracy ``[K]``.

    Args:
        states: ``[B, H]`` target hidden states (the cache's dtype, on the CPU; moved to the heads' device).
        prev: ``[B, K]`` tokens before each head's guess; labels: ``[B, K]`` head-vocabulary indices.
        decay: :attr:`TrainConfig.distance_decay`.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    device = next(heads.parameters()).device
    logits = heads(states.to(device).float(), prev.to(device))  # [B, K, V']; sequential heads read prev
    loss, top1 = medusa_loss(logits, labels.to(device), decay)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), top1.detach()


def run_steps(
    heads: MedusaHeads,
    opt: torch.optim.Optimizer,
    hidden: torch.Tensor,
    data: TrainingSet,
    cfg: TrainConfig,
    first_step: int,
    out: Path,
    progress: ProgressFn | None = None,
) -> float | None:
    """Steps ``first_step .. cfg.steps - 1`` on seeded batches, checkpointing; returns the loss' EMA.

    Step ``s`` samples its batch with the seed ``cfg.seed * 1_000_003 + s``, so a resumed run draws the
    batches an uninterrupted one would.
    """
    loss_ema: float | None = None
    acc_ema: torch.Tensor | None = None
    for step in range(first_step, cfg.steps):
        lr = cfg.lr * cosine_lr(step, cfg)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, data.pos.shape[0], (cfg.batch_size,), generator=g)
        p = data.pos[idx]
        loss, top1 = train_step(
            heads, opt, hidden[p[:, 0], p[:, 1]], data.prev[idx], data.labels[idx], lr, cfg.distance_decay
        )
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        acc_ema = top1 if acc_ema is None else 0.9 * acc_ema + 0.1 * top1
        if progress:
            progress(Progress("train", step + 1, cfg.steps, loss_ema, acc_ema.tolist(), lr))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(heads, opt, step + 1, out, cfg)
    return loss_ema


@dataclass
class Evaluation:
    """Held-out accuracy of the trained heads.

    Attributes:
        accuracy: ``[K][ranks]`` on labels that are the target's own greedy continuation (what decoding checks).
        accuracy_all: ``[K][ranks]`` on every label read in the corpus' context (noisier: the corpus may
            leave the target's path).
        accuracy_corpus: ``[K][ranks]`` on the held-out corpus windows when the tree is sized on answers.
        held_out: the positions measured.
    """

    accuracy: list[list[float]]
    accuracy_all: list[list[float]]
    accuracy_corpus: list[list[float]] | None
    held_out: Positions


def evaluate(heads: MedusaHeads, sources: Sources) -> Evaluation:
    """Per-head, per-rank accuracy on the held-out positions (some training ones when none are held out)."""
    heads.eval()
    train_part, held_out = sources.evaluated
    if held_out.pos.shape[0] == 0:
        held_out = Positions(
            train_part.pos[:2048], train_part.labels[:2048], train_part.prev[:2048], train_part.exact[:2048], 0
        )
    hidden = sources.hidden
    states = hidden[held_out.pos[:, 0], held_out.pos[:, 1]]
    accuracy = rank_accuracy(heads, states, held_out.labels, valid=held_out.exact, prev=held_out.prev)
    accuracy_all = rank_accuracy(heads, states, held_out.labels, prev=held_out.prev)
    corpus = sources.corpus[1]
    accuracy_corpus = None
    if sources.answers is not None and corpus.pos.shape[0]:
        accuracy_corpus = rank_accuracy(
            heads, hidden[corpus.pos[:, 0], corpus.pos[:, 1]], corpus.labels, valid=corpus.exact, prev=corpus.prev
        )
    return Evaluation(accuracy, accuracy_all, accuracy_corpus, held_out)


def choose_tree(
    target: torch.nn.Module, accuracy: list[list[float]], cfg: TrainConfig
) -> tuple[list[list[int]], float, dict[int, float] | None]:
    """The tree of at most ``cfg.max_tree_nodes`` that maximises expected tokens per unit of forward cost.

    Returns ``(tree, expected tokens per step, row costs measured on the target or None)``.
    """
    costs = measure_row_cost(target) if cfg.measure_cost else None
    tree, expected = tree_from_accuracies(
        accuracy, cfg.max_tree_nodes, (lambda r: row_cost(r, costs)) if costs else None
    )
    return tree, expected, costs


def save_heads(
    heads: MedusaHeads,
    opt: torch.optim.Optimizer,
    target: torch.nn.Module,
    ev: Evaluation,
    tree: list[list[int]],
    out: Path,
    cfg: TrainConfig,
) -> None:
    """Store the heads in the target's dtype with their accuracy and tree in ``out``, and the final checkpoint."""
    heads.config.head_accuracy = [[round(a, 4) for a in row] for row in ev.accuracy]
    heads.config.tree = tree or None
    heads.to(dtype=next(target.parameters()).dtype)
    heads.save(out)
    _save_checkpoint(heads, opt, cfg.steps, out, cfg)


def training_report(
    cfg: TrainConfig,
    sources: Sources,
    data: TrainingSet,
    subset: torch.Tensor | None,
    ev: Evaluation,
    tree: list[list[int]],
    expected: float,
    costs: dict[int, float] | None,
    train_seconds: float,
    final_loss: float | None,
    first_step: int,
) -> dict[str, Any]:
    """What ``train_report.json`` holds: accuracies, the tree, the positions used, wall times."""
    exact = ev.held_out.exact
    return {
        "top1": [row[0] for row in ev.accuracy],
        "top5": [sum(row[:5]) for row in ev.accuracy],
        "rank_accuracy": ev.accuracy,
        "top1_all_labels": [row[0] for row in ev.accuracy_all],
        "top5_all_labels": [sum(row[:5]) for row in ev.accuracy_all],
        "exact_label_share": [float(x) for x in exact.float().mean(0)] if exact.numel() else [],
        "exact_labels": cfg.exact_labels,
        "tree": tree,
        "tree_nodes": len(tree),
        "expected_tokens_per_step": expected,
        "row_cost": costs,
        "cache_positions": int(sources.corpus_windows * sources.hidden.shape[1]),
        "train_positions": int(data.pos.shape[0]),
        "train_positions_all": data.all_positions,
        "eval_positions": int(ev.held_out.pos.shape[0]),
        "subset_size": 0 if subset is None else int(subset.numel()),
        "subset_coverage": float((data.labels >= 0).float().mean()) if subset is not None else 1.0,
        "eval_on": "answers" if sources.answers is not None else "corpus",
        "top1_corpus": [row[0] for row in ev.accuracy_corpus] if ev.accuracy_corpus else None,
        "answer_windows": sources.answer_windows,
        "cache_seconds": sources.cache_seconds,
        "answer_seconds": sources.answer_seconds,
        "train_seconds": train_seconds,
        "final_loss": final_loss,
        "steps_run": cfg.steps - first_step,
    }


def train(
    target: torch.nn.Module,
    tokenizer: Any,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[MedusaHeads, dict[str, Any]]:
    """Train Medusa heads for ``target`` on ``data`` and save them to ``out``.

    ``resume`` continues from ``out/checkpoint`` when there is one (else the run starts afresh); the
    cached states in ``out`` are reused either way. Returns the heads and a report: per-head top-1
    accuracy, per-rank accuracy, the chosen tree with its expected tokens per step, wall times.
    """
    cfg = cfg or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.seq_len > int(getattr(target.config, "max_position_embeddings", cfg.seq_len) or cfg.seq_len):
        raise SpecdecError(f"seq_len {cfg.seq_len} exceeds the target's context", "lower --seq-len")
    torch.manual_seed(cfg.seed)
    sources = gather_sources(target, tokenizer, data, cfg, out, progress)
    vocab = output_rows(target)
    subset = frequent_tokens(sources.train_preds, cfg.subset_size, vocab)
    data_set = training_set(sources, subset, vocab, cfg)
    heads, opt, first_step = start_heads(target, cfg, subset, out, resume)

    t1 = time.perf_counter()
    final_loss = run_steps(heads, opt, sources.hidden, data_set, cfg, first_step, out, progress)
    train_seconds = time.perf_counter() - t1

    if progress:
        progress(Progress("eval", 0, 1))
    ev = evaluate(heads, sources)
    tree, expected, costs = choose_tree(target, ev.accuracy, cfg)
    save_heads(heads, opt, target, ev, tree, out, cfg)
    report = training_report(
        cfg, sources, data_set, subset, ev, tree, expected, costs, train_seconds, final_loss, first_step
    )
    write_atomic(out / "train_report.json", json.dumps(report, indent=2))
    return heads, report
