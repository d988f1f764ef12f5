"""The benchmark harness behind ``specdec-local bench``: it loads, runs and times the rows side by side.

Every speed claim of specdec comes from here: specdec's methods against
transformers' own greedy decoding, assisted generation and prompt lookup, in
one process, on the same prompt ids, dtype and threads.

Order of work, per prompt: for each repeat, every runner once, in a fixed
order (``hf-greedy``, ``hf-static``, ``hf-assisted``, ``hf-prompt-lookup``, then
``specdec-<method>``...), so that machine noise hits all methods alike. A
short warm-up generation per runner precedes the timed runs. The reported
time of a (prompt, runner) is the median over the repeats; tokens/s is the
number of new tokens over that median; ``speedup`` is tokens/s over
``hf-greedy``'s on the same prompt in the same run.

Length handling: every runner is greedy, starts from the same prompt ids and
stops at the same EOS set (the target's, as :meth:`SpeculativeGenerator.eos_token_ids`
gives it) or after ``max_new_tokens``; the EOS token, when reached, is counted
among the new tokens by all runners. ``identical`` compares the full new-token
lists, so two runs that diverge always differ, also in length.

The harness draws nothing on screen: pass ``on_event`` to follow progress
(the CLI draws a rich progress bar with it).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecdecError
from ..proposers import METHODS
from ..vocab import check_vocabularies
from .report import BASELINE, BenchReport, BenchRow, first_divergence

DEFAULT_METHODS: tuple[str, ...] = ("none", "draft", "prompt_lookup", "lookahead", "auto")
"""specdec methods benchmarked when none are named (medusa needs trained heads: with
``medusa_heads`` the bench's CLI adds it)."""

HF_PROMPT_LOOKUP_TOKENS = 10
"""``prompt_lookup_num_tokens`` of the ``hf-prompt-lookup`` baseline."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark; every default of the bench is defined here once.

    Attributes:
        target: packaged model name, folder, ``.gguf`` file or hub id.
        draft: the draft model (enables ``hf-assisted`` and ``specdec-draft``).
        prompts: a ``.jsonl`` prompt file; None = the set shipped with specdec.
        categories: keep only prompts of these categories (empty = all).
        methods: specdec methods, each benchmarked as ``specdec-<method>``.
        max_new_tokens: most new tokens per generation.
        dtype: ``auto`` (:func:`specdec.devices.resolve_dtype`), ``bfloat16``, ``float32`` or ``float16``,
            for target and draft; the report's config gives the dtype the target ran in.
        threads: ``torch.set_num_threads`` (None = leave torch's default).
        repeats: timed runs per (prompt, runner); the median time is reported.
        warmup_tokens: new tokens of the untimed warm-up run of each runner (0 = none).
        device: ``auto`` or a torch device string.
        num_speculative_tokens: fixed candidates per step for the specdec rows (None = adaptive).
        method_options: keyword options of each method's specdec row, by method (e.g.
            ``{"lookahead": {"window_size": 4}}``); a hardware profile fills them.
        medusa_heads: folder of trained Medusa heads for the target, given to the
            ``specdec-medusa`` row only (without them that row is skipped).
        static_cache: the specdec rows' static path (None = on for CUDA, off elsewhere).
        compile_steps: the specdec rows' static steps compiled by ``torch.compile`` (turns the static path on).
        strict: a method that cannot run here (``draft`` without a draft, ``medusa`` without heads) is an error
            before the run; when False (the default methods) its row is skipped and the report says why.
    """

    target: str
    draft: str | None = None
    prompts: str | None = None
    categories: tuple[str, ...] = ()
    methods: tuple[str, ...] = DEFAULT_METHODS
    max_new_tokens: int = 128
    dtype: str = "auto"
    threads: int | None = None
    repeats: int = 1
    warmup_tokens: int = 16
    device: str = "auto"
    num_speculative_tokens: int | None = None
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    medusa_heads: str | None = None
    static_cache: bool | None = None
    compile_steps: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SpecdecError(f"unknown method(s): {', '.join(unknown)}", f"choose from: {', '.join(METHODS)}")
        if not self.methods:
            raise SpecdecError("no method to benchmark", f"name at least one of: {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise SpecdecError(f"a method is named twice in {', '.join(self.methods)}")
        if self.strict:  # before anything loads: what the method needs and was not given
            for method, needs, given, flag in (
                ("draft", "a draft model", self.draft, "--draft"),
                ("medusa", "trained Medusa heads", self.medusa_heads, "--medusa-heads"),
            ):
                if method in self.methods and given is None:
                    raise SpecdecError(
                        f"method '{method}' needs {needs}", f"give {flag}, or leave {method} out of --methods"
                    )
        for name, value, low in (
            ("max_new_tokens", self.max_new_tokens, 1),
            ("repeats", self.repeats, 1),
            ("warmup_tokens", self.warmup_tokens, 0),
        ):
            if int(value) != value or value < low:
                raise SpecdecError(f"{name} must be an integer >= {low}, got {value}")
        if self.threads is not None and (int(self.threads) != self.threads or self.threads < 1):
            raise SpecdecError(f"threads must be an integer >= 1, got {self.threads}")
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise SpecdecError(f"unknown dtype {self.dtype!r}", "choose auto, bfloat16, float32 or float16")


# --------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class BenchPrompt:
    """One line of a prompt file: ``{"id": ..., "category": ..., "prompt": ...}``.

    ``prompt`` is the user message; it is wrapped in the target's chat template
    when the tokenizer has one.
    """

    id: str
    category: str
    prompt: str


def default_prompts_path() -> Path:
    """The prompt set shipped with specdec (``specdec/data/prompts.jsonl``)."""
    return Path(str(resources.files("specdec") / "data" / "prompts.jsonl"))


def load_prompts(path: str | Path | None = None, categories: Iterable[str] = ()) -> list[BenchPrompt]:
    """Read a ``.jsonl`` prompt file (None = the shipped set), keeping only ``categories`` if given."""
    file = Path(path) if path is not None else default_prompts_path()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SpecdecError(f"cannot read the prompt file {file}: {e.strerror or e}", "give a .jsonl file") from None
    prompts: list[BenchPrompt] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecdecError(f"{file}:{number}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) and item.get(k) for k in ("id", "category", "prompt")
        ):
            raise SpecdecError(f"{file}:{number}: each line needs non-empty string fields id, category and prompt")
        prompts.append(BenchPrompt(item["id"], item["category"], item["prompt"]))
    ids = [p.id for p in prompts]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SpecdecError(f"{file}: duplicate prompt id(s): {', '.join(duplicates)}")
    wanted = set(categories)
    if wanted:
        known = {p.category for p in prompts}
        missing = sorted(wanted - known)
        if missing:
            raise SpecdecError(
                f"no prompt of category {', '.join(missing)} in {file}", f"categories there: {', '.join(sorted(known))}"
            )
        prompts = [p for p in prompts if p.category in wanted]
    if not prompts:
        raise SpecdecError(f"{file} holds no prompt")
    return prompts


# --------------------------------------------------------------------------- runners
@dataclass
class RunResult:
    """One generation: the new tokens (EOS included when reached) and its wall-clock time."""

    token_ids: list[int]
    seconds: float
    mean_accepted_length: float | None = None
    acceptance_rate: float | None = None


Runner = Callable[[list[int], int], RunResult]
"""``runner(prompt_ids, max_new_tokens) -> RunResult``."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_runner(
    model: torch.nn.Module,
    eos_token_ids: Iterable[int],
    reset: Sequence[torch.nn.Module] = (),
    **generate_kwargs: Any,
) -> Runner:
    """A runner over ``model.generate(do_sample=False)`` with extra ``generate_kwargs``.

    Args:
        model: the target.
        eos_token_ids: the EOS set to stop at (the same as specdec's).
        reset: models whose ``generation_config`` is restored before every call;
            assisted generation stores its adapted draft length in the draft's
            ``generation_config``, which would carry over from run to run.
        **generate_kwargs: e.g. ``assistant_model=`` or ``prompt_lookup_num_tokens=``.
    """
    eos = sorted(int(t) for t in eos_token_ids)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    saved = [(m, copy.deepcopy(m.generation_config)) for m in (model, *reset)]
    device = next(model.parameters()).device

    def run(prompt_ids: list[int], max_new_tokens: int) -> RunResult:
        for m, config in saved:
            m.generation_config = copy.deepcopy(config)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids)
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos or None,
                pad_token_id=pad,
                **generate_kwargs,
            )
        _sync(device)
        seconds = time.perf_counter() - start
        return RunResult(token_ids=out[0, len(prompt_ids) :].tolist(), seconds=seconds)

    return run


def specdec_runner(generator: Any) -> Runner:
    """A runner over :meth:`SpeculativeGenerator.generate` (greedy)."""
    device = generator.device

    def run(prompt_ids: list[int], max_new_tokens: int) -> RunResult:
        _sync(device)
        start = time.perf_counter()
        result = generator.generate(list(prompt_ids), max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
        _sync(device)
        seconds = time.perf_counter() - start
        stats = result.stats
        return RunResult(
            token_ids=list(result.token_ids),
            seconds=seconds,
            mean_accepted_length=stats.mean_accepted_length if stats.steps else None,
            acceptance_rate=stats.acceptance_rate if stats.proposed else None,
        )

    return run


# --------------------------------------------------------------------------- progress and rows
@dataclass
class BenchEvent:
    """Progress of a bench: ``kind`` is ``"start"`` (with ``total`` runs), ``"warmup"`` or ``"run"``."""

    kind: str
    total: int = 0
    prompt_id: str = ""
    method: str = ""
    repeat: int = 0
    result: RunResult | None = None


def make_row(
    prompt: BenchPrompt,
    method: str,
    results: Sequence[RunResult],
    baseline: RunResult | None,
    baseline_tps: float | None,
) -> BenchRow:
    """Reduce the repeats of one runner on one prompt to a row (tokens of the first repeat, median time)."""
    first = results[0]
    seconds = statistics.median(r.seconds for r in results)
    tps = len(first.token_ids) / seconds if seconds > 0 else 0.0
    if baseline is None:
        identical, divergence = None, None
    else:
        divergence = first_divergence(first.token_ids, baseline.token_ids)
        identical = divergence is None
    return BenchRow(
        prompt_id=prompt.id,
        category=prompt.category,
        method=method,
        new_tokens=len(first.token_ids),
        seconds=seconds,
        tokens_per_second=tps,
        speedup=tps / baseline_tps if baseline_tps else None,
        mean_accepted_length=first.mean_accepted_length,
        acceptance_rate=first.acceptance_rate,
        identical=identical,
        first_divergence=divergence,
    )


# --------------------------------------------------------------------------- the harness
def machine_info(device: torch.device) -> dict[str, Any]:
    """``cpu``, ``threads``, ``torch``, ``transformers``, ``device`` of this process."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = device.type
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": name,
    }


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): other work skews every timing."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class Bench:
    """Runs the bench on loaded models (see :func:`run_bench` to load them by name).

    Args:
        target: the target model.
        tokenizer: its tokenizer (to render the prompts).
        config: what to run; ``config.target``/``draft`` only label the report here.
        draft: the draft model, if any.
        draft_tokenizer: the draft's tokenizer (vocabulary check of ``specdec-draft``).
    """

    def __init__(
        self,
        target: torch.nn.Module,
        tokenizer: Any,
        config: BenchConfig,
        draft: torch.nn.Module | None = None,
        draft_tokenizer: Any = None,
    ) -> None:
        from ..engine import SpeculativeGenerator

        self.config = config
        self.target = target.eval()
        self.tokenizer = tokenizer
        self.draft = draft.eval() if draft is not None else None
        self.encoder = SpeculativeGenerator(target, tokenizer, method="none")
        eos = self.encoder.eos_token_ids()
        self.runners: dict[str, Runner] = {BASELINE: hf_runner(target, eos)}
        # transformers' strongest plain decoding: a static cache (and, on CUDA, the compile it applies)
        self.runners["hf-static"] = hf_runner(target, eos, cache_implementation="static")
        if self.draft is not None:  # transformers' assisted generation fails deep in generate on another vocabulary
            check_vocabularies(target, self.draft, tokenizer, draft_tokenizer)
            self.runners["hf-assisted"] = hf_runner(target, eos, reset=(self.draft,), assistant_model=self.draft)
        self.runners["hf-prompt-lookup"] = hf_runner(target, eos, prompt_lookup_num_tokens=HF_PROMPT_LOOKUP_TOKENS)
        self.skipped: dict[str, str] = {}
        self.static_cache = self.compile_steps = False
        for method in config.methods:
            options = dict(config.method_options.get(method, {}))
            if method == "medusa" and config.medusa_heads is not None:
                options["medusa_heads"] = config.medusa_heads
            try:
                gen = SpeculativeGenerator(
                    target,
                    tokenizer,
                    method=method,
                    draft=self.draft,
                    draft_tokenizer=draft_tokenizer,
                    num_speculative_tokens=config.num_speculative_tokens,
                    static_cache=config.static_cache,
                    compile_steps=config.compile_steps,
                    prefix_cache=False,  # a repeated prompt would skip the prefill every other row pays
                    **options,
                )
            except SpecdecError as e:
                if config.strict:
                    raise
                self.skipped[method] = e.message
                continue
            self.runners[f"specdec-{method}"] = specdec_runner(gen)
            self.static_cache, self.compile_steps = gen.static_cache, gen.compile_steps

    def encode(self, prompt: BenchPrompt) -> list[int]:
        """Prompt ids, shared by every runner: the chat template when the tokenizer has one, else raw text."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.encoder.encode([{"role": "user", "content": prompt.prompt}])
        return self.encoder.encode(prompt.prompt)

    def run(self, prompts: Sequence[BenchPrompt], on_event: Callable[[BenchEvent], None] | None = None) -> BenchReport:
        """Warm up every runner, then time them per prompt, interleaved; return the report."""
        emit = on_event or (lambda event: None)
        cfg = self.config
        encoded = [(p, self.encode(p)) for p in prompts]
        warm = cfg.warmup_tokens > 0
        emit(BenchEvent("start", total=len(self.runners) * (len(prompts) * cfg.repeats + int(warm))))
        if warm:
            for name, runner in self.runners.items():
                result = runner(encoded[0][1], cfg.warmup_tokens)
                emit(BenchEvent("warmup", prompt_id=encoded[0][0].id, method=name, result=result))
        load_before = load_average()
        rows: list[BenchRow] = []
        for prompt, ids in encoded:
            results: dict[str, list[RunResult]] = {name: [] for name in self.runners}
            for repeat in range(cfg.repeats):
                for name, runner in self.runners.items():
                    result = runner(ids, cfg.max_new_tokens)
                    results[name].append(result)
                    emit(BenchEvent("run", prompt_id=prompt.id, method=name, repeat=repeat, result=result))
            base = make_row(prompt, BASELINE, results[BASELINE], None, None)
            base.speedup, base.identical = 1.0, True
            rows.append(base)
            for name in self.runners:
                if name != BASELINE:
                    rows.append(make_row(prompt, name, results[name], results[BASELINE][0], base.tokens_per_second))
        device = next(self.target.parameters()).device
        return BenchReport(
            machine=machine_info(device),
            config={
                "target": cfg.target,
                "draft": cfg.draft,
                "dtype": str(self.target.dtype).removeprefix("torch."),
                "max_new_tokens": cfg.max_new_tokens,
                "static_cache": self.static_cache,
                "compile_steps": self.compile_steps,
            },
            rows=rows,
            skipped=dict(self.skipped),
            repeats=cfg.repeats,
            load=(load_before, load_average()) if load_before is not None else None,
        )


def run_bench(
    config: BenchConfig,
    on_event: Callable[[BenchEvent], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> BenchReport:
    """Load the prompts and models of ``config``, set the threads, run the bench.

    ``on_status`` receives one line per slow preparation step (loading a model).
    """
    from ..loading import load_model

    status = on_status or (lambda text: None)
    prompts = load_prompts(config.prompts, config.categories)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    status(f"loading target {config.target} ({config.dtype})")
    target, tokenizer = load_model(config.target, dtype=config.dtype, device=config.device)
    draft = draft_tokenizer = None
    if config.draft is not None:
        status(f"loading draft {config.draft} ({config.dtype})")
        draft, draft_tokenizer = load_model(config.draft, dtype=config.dtype, device=str(target.device))
    bench = Bench(target, tokenizer, config, draft=draft, draft_tokenizer=draft_tokenizer)
    return bench.run(prompts, on_event)
