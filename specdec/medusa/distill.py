"""In-distribution self-distillation data: the target's own answers to instructions.

Heads trained on raw corpus windows see the corpus' style (library source,
documents); in a chat UI they are asked to continue the target's *answers*
(prose, Markdown, code blocks). This module closes that gap cheaply:

1. :func:`instructions_from_texts` turns the training corpus into chat
   instructions. From Python source (parsed with :mod:`ast`), each function
   or class with a docstring yields one request of a kind a coding assistant
   gets: write it from its description, edit it (type hints, refactoring,
   error handling), test it, explain it, or a how-to question; any other
   text yields a summarisation request.
2. :func:`answer_features` lets the target answer them greedily, many at once
   (one batched forward per new token: on a 2-core CPU, 32 rows cost ~2.4x one
   row, so ~13x the tokens per second of one-row decoding). The hidden state
   and the greedy token of every answer position are kept as they are
   computed, so every label is exactly the target's own continuation and no
   second pass over the text is needed.

The windows it returns have the layout of the corpus cache
(:func:`specdec.medusa.train.collect_features`): ``tokens[:, t + 1] == preds[:, t]``
along each answer, and ``tokens`` is :data:`ENDED` after an answer's end.
"""

from __future__ import annotations

import ast
import random
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import SpecdecError

ENDED = -1  # token id stored after an answer's end: no label is read across it
MAX_PROMPT_TOKENS = 512
MIN_LINES, MAX_LINES = 4, 30
MAX_UNITS_PER_TEXT = 2
SUMMARY_CHARS = (300, 1500)
PROSE_SHARE = 0.85

# (kind, template): {name}, {signature}, {summary} (the docstring's first sentence), {code}
CODE_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("codegen", 'Write a Python function `{signature}`. Its docstring says: "{summary}." Use type hints.'),
    ("codegen", 'Implement `{signature}` in Python ("{summary}") and explain the approach briefly.'),
    ("edit", "Add type hints to this function and return the full function.\n\n```python\n{code}\n```"),
    (
        "edit",
        "Refactor this code for readability without changing its behaviour, and return the whole "
        "code.\n\n```python\n{code}\n```",
    ),
    ("edit", "Add input validation and error handling to this code. Return the complete result.\n\n{code}"),
    ("tests", "Write pytest unit tests for this code.\n\n```python\n{code}\n```"),
    ("explain", "Explain what this code does, step by step.\n\n```python\n{code}\n```"),
    ("explain", "Summarize what `{name}` does in a few bullet points.\n\n{code}"),
    ("chat", 'How would you do this in Python: "{summary}"? Explain the idea and show a short example.'),
)
CLASS_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("codegen", 'Write a Python class `{name}` ("{summary}"). Include docstrings and type hints.'),
    ("explain", "Explain the design of this class and how to use it.\n\n```python\n{code}\n```"),
)
TEXT_TEMPLATE = "Summarize the following text in a few bullet points.\n\n{text}"


# ---------------------------------------------------------------- instructions
def _summary(doc: str) -> str | None:
    """The docstring's first sentence without its full stop, or None if unusable."""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    first = first.split(". ")[0].rstrip(".").strip()
    if not 15 <= len(first) <= 160 or not first[0].isalpha():
        return None
    return first


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
    if node.args.vararg:
        args.append("*" + node.args.vararg.arg)
    args += [a.arg for a in node.args.kwonlyargs]
    if node.args.kwarg:
        args.append("**" + node.args.kwarg.arg)
    return f"{node.name}({', '.join(args)})"


def python_units(source: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``("function"|"class", fields)`` for each documented definition of a short length.

    ``fields`` fills the templates: ``name``, ``signature``, ``summary``, ``code``.
    Nothing for text that is not Python.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith(("__", "test")) or node.end_lineno is None:
            continue
        doc = ast.get_docstring(node)
        summary = _summary(doc) if doc else None
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if summary is None or not MIN_LINES <= node.end_lineno - first + 1 <= MAX_LINES:
            continue
        code = textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])).strip()
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        signature = node.name if kind == "class" else _signature(node)
        yield kind, {"name": node.name, "signature": signature, "summary": summary, "code": code}


def _is_python(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _is_prose(text: str) -> bool:
    """Mostly letters and spaces (not code, tables or data)."""
    return sum((c.isascii() and c.isalpha()) or c == " " for c in text) >= PROSE_SHARE * len(text)


def _text_chunk(text: str, rng: random.Random) -> str | None:
    """A run of whole paragraphs of ``text`` between :data:`SUMMARY_CHARS` characters long, or None."""
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paras:
        return None
    start = rng.randrange(len(paras))
    chunk = ""
    for p in paras[start:]:
        if len(chunk) + len(p) > SUMMARY_CHARS[1]:
            break
        chunk = f"{chunk}\n\n{p}" if chunk else p
    return chunk if len(chunk) >= SUMMARY_CHARS[0] else None


def instructions_from_texts(texts: list[str], count: int, seed: int = 0) -> list[str]:
    """Up to ``count`` chat instructions made from the corpus (seeded, deterministic).

    Documents are visited in a seeded order; each gives at most
    :data:`MAX_UNITS_PER_TEXT` instructions (a documented Python function or
    class with a template drawn for it, or a summarisation request for other
    text), so the instructions spread over the corpus.
    """
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    out: list[str] = []
    for i in order:
        if len(out) >= count:
            break
        units = list(python_units(texts[i]))
        if units:
            for kind, fields in rng.sample(units, min(MAX_UNITS_PER_TEXT, len(units))):
                _, template = rng.choice(CLASS_TEMPLATES if kind == "class" else CODE_TEMPLATES)
                out.append(template.format(**fields))
        elif not _is_python(texts[i]):
            chunk = _text_chunk(texts[i], rng)
            if chunk and _is_prose(chunk):
                out.append(TEXT_TEMPLATE.format(text=chunk))
    return out[:count]


def prompt_ids(tokenizer: Any, instruction: str) -> list[int]:
    """The instruction as the user turn of the chat template, ready for the answer (plain text + newline without one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = instruction + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- answers
def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], mask [B, P])`` with the prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def answer_batch(
    target: torch.nn.Module,
    prompts: list[list[int]],
    length: int,
    eos: set[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy answers to ``prompts`` in one batch, with the target's state at every answer position.

    Window position 0 is each prompt's last token; position ``t`` holds the
    ``t``-th answer token. Rows that reach an EOS id stop there (their later
    positions hold :data:`ENDED`, their states and predictions stay 0) and leave
    the batch, so the forwards shrink as answers end; the batch stops when every row has.

    Args:
        prompts: ``B`` token-id lists; length: window length ``L`` (``L - 1`` answer tokens are fed back).
    Returns:
        ``hidden [B, L, H]`` (target dtype, final post-norm states), ``preds [B, L]``
        int32 (greedy token after each position) and ``tokens [B, L]`` int32
        (``tokens[:, t + 1] == preds[:, t]`` until the end).
    """
    from .. import kvcache
    from ..modelinfo import decoder_body

    body, lm_head = decoder_body(target), target.get_output_embeddings()
    device = next(target.parameters()).device
    pad = min(eos) if eos else 0
    ids, mask = _left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    batch = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache, cache_arg = kvcache.new_cache(target), kvcache.cache_argument(body)
    hidden = torch.zeros(batch, length, body.config.hidden_size, dtype=next(target.parameters()).dtype)
    preds = torch.zeros(batch, length, dtype=torch.int32)
    tokens = torch.full((batch, length), ENDED, dtype=torch.int32)
    tokens[:, 0] = ids[:, -1].to(torch.int32).cpu()
    ended = torch.zeros(batch, dtype=torch.bool)
    live = torch.arange(batch)  # [b] the rows still decoding, in the order of the forward's (and the cache's) rows
    step_ids, step_pos = ids, positions
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long)
    for t in range(length):
        h = body(
            input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **{cache_arg: cache}
        ).last_hidden_state[:, -1]  # [b, H]
        nxt = lm_head(h).argmax(-1)  # [b]
        hidden[live, t] = h.cpu()
        preds[live, t] = nxt.to(torch.int32).cpu()
        if t > 0:  # a row ends at its EOS token: nothing after it is an answer
            ended |= torch.isin(tokens[:, t].long(), eos_ids)
        if t + 1 == length:
            break
        tokens[:, t + 1] = torch.where(ended, ENDED, preds[:, t])
        if bool((ended | torch.isin(tokens[:, t + 1].long(), eos_ids)).all()):
            break  # every row has ended: position t + 1 and later are never read (their states stay 0)
        going = ~ended[live]  # [b]
        if not bool(going.all()):  # rows that ended leave the batch (and the cache)
            keep = going.nonzero().flatten()
            live, rows = live[keep], keep.to(device)
            nxt, step_pos, mask = nxt[rows], step_pos[rows], mask[rows]
            cache.batch_select_indices(rows)
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return hidden, preds, tokens


def answer_features(
    target: torch.nn.Module,
    prompts: list[list[int]],
    length: int,
    batch_size: int,
    eos: set[int],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`answer_batch` over every prompt, ``batch_size`` at a time (``[N, L, ...]`` as there).

    Prompts of similar length are batched together (less padding); the rows
    come back in the order of ``prompts``.
    """
    from ..modelinfo import model_context_length

    if max(len(p) for p in prompts) + length > model_context_length(target):
        raise SpecdecError(f"a prompt + answer of {length} tokens exceeds the target's context", "lower --seq-len")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        h, p, tk = answer_batch(target, [prompts[i] for i in rows], length, eos)
        for j, i in enumerate(rows):
            parts[i] = (h[j], p[j], tk[j])
        if progress:
            progress(min(first + batch_size, len(order)), len(order))
    return tuple(torch.stack([parts[i][k] for i in range(len(prompts))]) for k in range(3))  # type: ignore[return-value]


def instruction_prompts(tokenizer: Any, instructions: list[str], count: int, max_tokens: int) -> list[list[int]]:
    """The first ``count`` instructions whose chat prompt (:func:`prompt_ids`) has at most ``max_tokens`` tokens."""
    out: list[list[int]] = []
    for s in instructions:
        ids = prompt_ids(tokenizer, s)
        if len(ids) <= max_tokens:
            out.append(ids)
            if len(out) == count:
                break
    return out
