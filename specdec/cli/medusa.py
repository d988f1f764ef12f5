"""``specdec-local train-medusa``: train Medusa heads for a target on this machine."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import SpecdecError
from ..files import check_writable
from ..medusa.train import CHECKPOINT_DIR, Progress, TrainConfig
from .common import quiet_libraries, report_errors

_D = TrainConfig.__dataclass_fields__  # defaults are defined once, in TrainConfig


def _default(name: str) -> Any:
    return _D[name].default


@click.command("train-medusa")
@click.option("--target", "-t", required=True, help="Packaged model name, local folder, .gguf file or hub id.")
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="Training text: a text file, a .jsonl file or a folder of files "
    "(e.g. Python's stdlib: python -c 'import sysconfig; print(sysconfig.get_paths()[\"stdlib\"])').",
)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the heads.")
@click.option("--heads", "num_heads", type=click.IntRange(min=1), default=_default("num_heads"), show_default=True)
@click.option(
    "--layers",
    "num_layers",
    type=click.IntRange(min=1),
    default=_default("num_layers"),
    show_default=True,
    help="Residual blocks per head.",
)
@click.option("--steps", type=click.IntRange(min=1), default=_default("steps"), show_default=True)
@click.option("--seq-len", type=click.IntRange(min=8), default=_default("seq_len"), show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_default("lr"), show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_default("batch_size"),
    show_default=True,
    help="Positions per step.",
)
@click.option(
    "--cache-tokens",
    type=click.IntRange(min=8),
    default=_default("cache_tokens"),
    show_default=True,
    help="Positions whose target hidden states are computed once and cached (the costly part).",
)
@click.option(
    "--subset-size",
    type=click.IntRange(min=0),
    default=_default("subset_size"),
    show_default=True,
    help="Heads propose only the N tokens the target predicts most often (0 = all); verification stays exact.",
)
@click.option(
    "--exact-labels/--all-labels",
    default=_default("exact_labels"),
    show_default=True,
    help="Train head k at a position only where the corpus' next k+1 tokens are the target's own greedy "
    "predictions, so every label is the target's own continuation (fewer, cleaner labels).",
)
@click.option(
    "--answers",
    type=click.IntRange(min=0),
    default=_default("answers"),
    show_default=True,
    help="Also let the target answer this many instructions made from --data (write, edit, test or "
    "explain its functions; summarise its prose) and train on its answers: in-distribution for a "
    "chat UI, every label exact. Answers are cached in OUT/answers; the held-out ones size the tree.",
)
@click.option(
    "--answer-batch",
    type=click.IntRange(min=1),
    default=_default("answer_batch"),
    show_default=True,
    help="Answers computed together (one batched forward per token).",
)
@click.option(
    "--cache-save-every",
    type=click.IntRange(min=0),
    default=_default("cache_save_every"),
    show_default=True,
    help="Windows between saves of OUT/cache while it is computed (0 = at the end).",
)
@click.option(
    "--measure-cost/--no-measure-cost",
    default=_default("measure_cost"),
    show_default=True,
    help="Time target forwards of several sizes to size the tree; without it (or on a busy machine, "
    "where timings mislead) the reference CPU's cost table is used.",
)
@click.option(
    "--own-lm-head", is_flag=True, help="Train a projection per head instead of sharing the target's lm_head."
)
@click.option(
    "--sequential",
    is_flag=True,
    help="Sequential heads (Hydra-style): each head also reads the token before its guess, so a deeper "
    "guess knows the path it extends. Same training cost; the tree is read level by level.",
)
@click.option(
    "--chat-wrap/--no-chat-wrap",
    default=_default("chat_wrap"),
    show_default=True,
    help="Put the training text in the assistant turn of the chat template.",
)
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=_default("checkpoint_every"), show_default=True)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from OUT/checkpoint when there is one (else start afresh); OUT/cache is reused either way.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Train afresh into an OUT that holds trained heads, replacing them and dropping OUT/checkpoint at once "
    "(without it such an OUT is refused).",
)
@click.option(
    "--cache-only",
    is_flag=True,
    help="Only compute OUT/cache (the target's states) and stop; a later run with the same data, "
    "--seq-len, --seed and at most as many --cache-tokens reuses it.",
)
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True
)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@report_errors
def train_medusa(
    target: str,
    data: str,
    out: str,
    resume: bool,
    overwrite: bool,
    cache_only: bool,
    dtype: str,
    device: str,
    threads: int | None,
    **options: Any,
) -> None:
    """Train Medusa heads for TARGET by self-distillation (the target stays frozen).

    Each head learns the target's own greedy prediction k+2 tokens ahead, so
    acceptance tracks the target. Decoding with the heads is lossless by
    default (--method medusa --medusa-heads OUT).
    """
    quiet_libraries()
    cfg = TrainConfig(**options)
    if not Path(data).expanduser().exists():
        raise SpecdecError(f"training data not found: {data}", "give a text file, a .jsonl file or a folder of files")
    check_writable(out, "--out", folder=True)  # before the slow load
    if not (resume or overwrite or cache_only):
        _refuse_trained(Path(out))
    if overwrite:  # afresh: a checkpoint of the run replaced must not be resumed later as if it were this one's
        shutil.rmtree(Path(out) / CHECKPOINT_DIR, ignore_errors=True)
    with _removed_if_left_empty(Path(out)):
        _train_into(target, data, out, resume, cache_only, dtype, device, threads, cfg)


@contextlib.contextmanager
def _removed_if_left_empty(out: Path) -> Iterator[None]:
    """Remove ``out`` if this run created it and a failure left it empty (a rejected argument, Ctrl-C
    during the load), so that no empty folder looks like a run's output."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _train_into(
    target: str,
    data: str,
    out: str,
    resume: bool,
    cache_only: bool,
    dtype: str,
    device: str,
    threads: int | None,
    cfg: TrainConfig,
) -> None:
    """Load ``target``, then cache its states (``cache_only``) or train heads into ``out`` and report."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = _load_target(target, dtype, device)
    from ..medusa.train import load_or_answer, load_or_collect, train

    if cache_only:
        t0 = time.perf_counter()
        with _ProgressView(cfg) as view:
            hidden, _, _, _ = load_or_collect(model, tokenizer, data, cfg, Path(out), progress=view.update)
            answers = load_or_answer(model, tokenizer, data, cfg, Path(out), view.update)[0] if cfg.answers else None
        click.echo(
            f"cached {hidden.shape[0]} windows ({hidden.shape[0] * hidden.shape[1]} positions) in {out}/cache"
            + (f" and {answers.shape[0]} answers in {out}/answers" if answers is not None else "")
            + f" in {time.perf_counter() - t0:.0f}s"
        )
        return
    try:
        with _ProgressView(cfg) as view:
            heads, report = train(model, tokenizer, data, out, cfg, resume=resume, progress=view.update)
    except KeyboardInterrupt:
        click.echo(
            f"stopped: the cached states in {out} are kept, and --resume continues from the last checkpoint "
            f"in {out}/checkpoint (if one was written)",
            err=True,
        )
        raise
    top1 = ", ".join(f"head {k}: {a:.1%}" for k, a in enumerate(report["top1"]))
    top1_all = ", ".join(f"head {k}: {a:.1%}" for k, a in enumerate(report["top1_all_labels"]))
    click.echo(f"saved {cfg.num_heads} heads to {out}")
    click.echo(f"held-out top-1 accuracy on the target's own continuation ({report['eval_on']}): {top1}")
    click.echo(f"held-out top-1 accuracy on every label (corpus context): {top1_all}")
    click.echo(
        f"tree: {report['tree_nodes']} nodes, expected {report['expected_tokens_per_step']:.2f} tokens/step "
        f"(incl. the +1); cache {report['cache_seconds']:.0f}s, answers {report['answer_seconds']:.0f}s, "
        f"training {report['train_seconds']:.0f}s"
    )
    click.echo(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "top1",
                    "top5",
                    "top1_all_labels",
                    "top5_all_labels",
                    "tree_nodes",
                    "expected_tokens_per_step",
                )
            }
        )
    )


def _refuse_trained(out: Path) -> None:
    """Raise a :class:`SpecdecError` when ``out`` holds trained heads: a run started afresh would replace
    them (hours of training) without a word."""
    from ..medusa.heads import WEIGHTS_NAME

    if (out / WEIGHTS_NAME).exists():
        raise SpecdecError(
            f"--out {out} holds trained heads ({WEIGHTS_NAME}); training afresh would replace them",
            "give another --out, --resume to continue that training, or --overwrite to replace them",
        )


def _load_target(target: str, dtype: str, device: str) -> tuple[Any, Any]:
    from ..loading import load_model

    try:
        return load_model(target, dtype=dtype, device=device)
    except MemoryError:
        raise SpecdecError(
            f"the target {target!r} does not fit in memory", "train heads for a smaller target, or use --dtype bfloat16"
        ) from None
    except RuntimeError as e:
        if "memory" in str(e).lower() or "alloc" in str(e).lower():
            raise SpecdecError(
                f"the target {target!r} does not fit in memory: {str(e).splitlines()[0]}",
                "train heads for a smaller target, or use --dtype bfloat16",
            ) from None
        raise


class _ProgressView:
    """A rich progress bar: cache phase, then steps with loss and per-head top-1 accuracy.

    Without a terminal (output sent to a log file) a bar draws nothing until
    the end, so a plain line is printed instead, at most every
    :data:`LOG_EVERY_S` seconds per phase and when a phase completes.
    """

    LOG_EVERY_S = 60.0

    def __init__(self, cfg: TrainConfig) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as Bar,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from rich.console import Console

        console = Console()
        self.bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not console.is_terminal,  # a log file gets the plain lines alone, not the bar's last frame
        )
        self.tasks: dict[str, int] = {}
        self.logged: dict[str, float] = {}
        self.started: dict[str, float] = {}

    def __enter__(self) -> "_ProgressView":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, p: Progress) -> None:
        names = {
            "cache": "caching target states",
            "answers": "target answering instructions",
            "train": "training heads",
            "eval": "measuring accuracy",
        }
        if p.phase not in self.tasks:
            self.tasks[p.phase] = self.bar.add_task(names[p.phase], total=p.total, info="")
            self.started[p.phase] = self.logged[p.phase] = time.monotonic()
        info = ""
        if p.loss is not None:
            accs = " ".join(f"{a:.0%}" for a in (p.head_acc or []))
            info = f"loss {p.loss:.3f}  top-1 on training batches {accs}  lr {p.lr:.2e}"
        self.bar.update(self.tasks[p.phase], completed=p.done, total=p.total, info=info)
        now = time.monotonic()
        if not self.bar.console.is_terminal and (
            now - self.logged[p.phase] >= self.LOG_EVERY_S or (p.done == p.total and p.total > 0)
        ):
            self.logged[p.phase] = now
            self.bar.console.print(
                f"{names[p.phase]}: {p.done}/{p.total} after {now - self.started[p.phase]:.0f}s"
                + (f"  {info}" if info else ""),
                soft_wrap=True,  # one line per report, however narrow the console thinks it is
            )


commands = [train_medusa]
