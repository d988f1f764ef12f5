"""The one decode loop: propose, verify in one target forward, commit, stream.

:class:`SpeculativeGenerator` is the API every front end uses (CLI, bench,
webui extension). The method only chooses the proposer; the loop, the
verifier and the KV bookkeeping are shared.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .costs import model_cost_kind
from .errors import ChatContentError, ContextLengthError, GeneratorBusyError, SpecdecError
from .modelinfo import eos_token_ids, model_context_length
from .proposers import MethodOptions, ProposerContext, build_proposer, method_and_options
from .proposers.base import DecodeState, Proposal, StepOutcome
from .sampling import SamplingConfig, check_request, is_int
from .static import BUCKETS, StaticKV, check_compile_steps, open_cache
from .stream import IncrementalDecoder, StopStringMatcher, detokenize
from .tree import ancestor_mask, depths
from .verify import TypicalAcceptance, verify
from .vocab import check_vocabularies

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


def message_text(content: Any, index: int) -> str:
    """A chat message's text: its ``content`` string, or its text parts joined by newlines.

    Raises:
        ChatContentError: content that is not text, naming the message's ``index`` and the first part that is
            not text.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatContentError(index, None, f"{content!r:.80}")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            what = f"of type {part.get('type')!r}" if isinstance(part, dict) else f"{part!r:.80}"
            raise ChatContentError(index, j, what)
        texts.append(part["text"])
    return "\n".join(texts)


@dataclass
class GenerationStats:
    """Counters of one generation.

    ``mean_accepted_length`` is new tokens per step, *including* the recovered
    or bonus token of each step; ``acceptance_rate`` is accepted / proposed
    candidates (a tree's every node counts as proposed, so trees, which verify
    alternatives, show a lower rate for more tokens per step). ``cached_tokens`` are the prompt's first tokens whose KV was
    kept from the previous generation (a chat's earlier turns), not computed again.
    """

    method: str = ""
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    graph_capture_seconds: float = 0.0
    static_cache: bool = False
    compile_steps: bool = False

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            mean_accepted_length=self.mean_accepted_length,
            acceptance_rate=self.acceptance_rate,
            tokens_per_second=self.tokens_per_second,
        )
        return d

    def summary(self) -> str:
        kept = f", {self.cached_tokens} of {self.prompt_tokens} prompt tokens kept" if self.cached_tokens else ""
        return (
            f"{self.new_tokens} tokens in {self.seconds:.2f}s ({self.tokens_per_second:.2f} tok/s), "
            f"method {self.method}, mean accepted length {self.mean_accepted_length:.2f} (incl. bonus), "
            f"acceptance rate {self.acceptance_rate:.1%}{kept}"
        )


@dataclass
class GenerationResult:
    """What :meth:`SpeculativeGenerator.generate` returns.

    Attributes:
        token_ids: the new tokens only (an EOS that ended generation included;
            with a stop string, up to the token that completed it).
        text: decoded new text (special tokens skipped, cut before a stop
            string), or None without a tokenizer.
        finish_reason: ``"eos"``, ``"stop"`` or ``"length"`` (a prompt plus ``max_new_tokens`` beyond the
            context is refused up front with :class:`~specdec.errors.ContextLengthError`).
    """

    token_ids: list[int]
    text: str | None
    stats: GenerationStats
    finish_reason: str
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class StreamEvent:
    """One increment of a stream: the new stable text and the tokens accepted in this step.

    ``stats`` is a snapshot taken as the event was made; its ``seconds`` count decoding only, not the time
    the caller spent with earlier events.
    """

    text: str
    token_ids: list[int]
    stats: GenerationStats
    done: bool = False
    finish_reason: str | None = None


class SpeculativeGenerator:
    """Lossless speculative decoding over a transformers causal LM.

    Args:
        target: the model whose output is reproduced.
        tokenizer: its tokenizer (needed for ``str``/chat prompts, text and stop strings).
        method: ``"none"``, ``"draft"``, ``"prompt_lookup"``, ``"lookahead"``,
            ``"medusa"`` or ``"auto"``.
        draft: a draft model sharing the target's tokenizer (method ``"draft"``).
        num_speculative_tokens: fixed number of candidates per step; None adapts it.
        draft_tokenizer: the draft's tokenizer, to check that the vocabularies agree.
        static_cache: run the target and the draft on preallocated caches at fixed row buckets,
            captured as CUDA graphs on CUDA (:mod:`specdec.static`); None = on for CUDA, off elsewhere.
        compile_steps: compile the static path's steps with ``torch.compile`` (inductor) before they are
            captured, fusing each layer's small kernels (needs the static cache: None turns it on). The first
            step of each kind pays the compile (``GenerationStats.graph_capture_seconds``). Greedy output stays
            the target's up to rounding: fused kernels round like the eager ones only to ~1e-7 in float32.
        prefix_cache: keep the KV of the previous generation's tokens (prompt and reply) and compute
            only what a new prompt does not share with them: a chat's earlier turns are not
            prefilled again. ``GenerationStats.cached_tokens`` says how many were kept.
        options: the method's options as an object (:mod:`specdec.proposers.options`, e.g.
            ``LookaheadOptions(window_size=4)``); with ``method="auto"`` its class names the method.
        **method_options: or the method's options as keywords (``window_size``, ``ngram_size``,
            ``guess_size``, ``medusa_heads``, ``tree``, ``tree_size``, ``max_ngram``...): only the
            chosen method's (once ``auto`` is resolved); None means the default, and a value for
            another method's option is an error. Medusa's ``typical_acceptance=True`` (with
            ``posterior_threshold``, ``posterior_alpha``) is LOSSY when sampling and off by default:
            see :class:`specdec.verify.TypicalAcceptance`.

    Verification is exact unless the proposer carries a ``typical_acceptance``
    attribute that is not None (only Medusa's, and only when asked for); that
    option is handed to the one verifier, which applies it when sampling.

    Attribute ``cost_kind`` (:func:`specdec.costs.model_cost_kind` of the target) names the prior
    row costs the draft-length controllers start each generation from; a projection may set it to
    another kind (``"cuda"``) to record, on a CPU, the proposals a run there would make.
    """

    def __init__(
        self,
        target: torch.nn.Module,
        tokenizer: Any = None,
        method: str = "auto",
        draft: torch.nn.Module | None = None,
        num_speculative_tokens: int | None = None,
        *,
        draft_tokenizer: Any = None,
        static_cache: bool | None = None,
        compile_steps: bool = False,
        prefix_cache: bool = True,
        options: MethodOptions | None = None,
        **method_options: Any,
    ) -> None:
        self.target = target.eval()
        self.tokenizer = tokenizer
        self.draft = draft.eval() if draft is not None else None
        self.method, self.options = method_and_options(method, draft, options, method_options)
        if num_speculative_tokens is not None and (not is_int(num_speculative_tokens) or num_speculative_tokens < 0):
            raise SpecdecError(
                f"num_speculative_tokens must be an integer >= 0, got {num_speculative_tokens!r}",
                "leave it unset for an adaptive draft length",
            )
        if self.draft is not None and self.method == "draft":
            check_vocabularies(target, self.draft, tokenizer, draft_tokenizer)
        self.device = next(target.parameters()).device
        self.cost_kind = model_cost_kind(target)  # which prior row costs the proposers start from
        self.context_length = model_context_length(target)
        check_compile_steps(static_cache, compile_steps)
        if static_cache is None:
            static_cache = compile_steps or self.device.type == "cuda"
        self.kv = open_cache(target, static=bool(static_cache), compile_steps=compile_steps)
        self.kv.reuse = prefix_cache
        self.proposer = build_proposer(
            self.method,
            ProposerContext(
                target=target,
                draft=self.draft,
                tokenizer=tokenizer,
                num_speculative_tokens=num_speculative_tokens,
                options=self.options,
                static_cache=self.static_cache,
                compile_steps=self.compile_steps,
                prefix_cache=prefix_cache,
            ),
        )
        self.typical_acceptance: TypicalAcceptance | None = getattr(self.proposer, "typical_acceptance", None)
        self.last_stats: GenerationStats | None = None
        self._busy = threading.Lock()  # held while a generation computes (released while its stream waits)
        self._generation = 0  # the generation that owns the KV caches now

    @property
    def static_cache(self) -> bool:
        """Whether the target runs on the static path (:mod:`specdec.static`)."""
        return isinstance(self.kv, StaticKV)

    @property
    def compile_steps(self) -> bool:
        """Whether the target's static steps run compiled (False after a failed compile)."""
        return isinstance(self.kv, StaticKV) and self.kv.compiled

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a ``str`` (raw text), chat messages, or token ids: a list, a ``[L]`` tensor or array, or
        a tokenizer's output for one text (``tokenizer(text)``, ``[1, L]`` tensors included)."""
        if isinstance(prompt, str):
            self._need_tokenizer("a text prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, (bytes, bytearray)):
            raise SpecdecError(
                f"a prompt in bytes ({bytes(prompt[:20])!r}...) is neither text nor token ids",
                "decode it first, e.g. data.decode('utf-8')",
            )
        if isinstance(prompt, Mapping) and "input_ids" in prompt:  # tokenizer(text): a BatchEncoding
            prompt = prompt["input_ids"]
        batch = getattr(prompt, "ndim", 1) == 2 or (
            isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple))
        )
        if batch and len(prompt) == 1:
            prompt = prompt[0]  # a batch of one: [1, L]
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:  # ids as a tensor (a numpy array lists as is)
            prompt = prompt.tolist()
        try:
            items = list(prompt)
        except TypeError:
            raise SpecdecError(
                f"a prompt must be a str, a list of token ids or a list of chat messages, got {type(prompt).__name__}"
            ) from None
        if items and isinstance(items[0], dict):
            return self._encode_chat(items)
        if not all(is_int(t) for t in items):
            raise SpecdecError(
                "a prompt must be a str, a list of token ids or a list of chat messages",
                "token ids may also be a [L] tensor or array; a batch holds one prompt at most",
            )
        return [int(t) for t in items]

    def _encode_chat(self, messages: list[Any]) -> list[int]:
        """Token ids of chat messages rendered with the tokenizer's chat template; a message's ``content`` is a
        string or a list of text parts (``{"type": "text", "text": ...}``). The reply opens a new assistant turn,
        or, when the last message is the assistant's, continues that message (a chat UI's "continue")."""
        self._need_tokenizer("chat messages")
        rendered = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise SpecdecError(
                    f"chat message {i} must be a dict with a 'role' string and a 'content' string, got {message!r:.80}",
                    'e.g. [{"role": "user", "content": "Hello"}]',
                )
            rendered.append({**message, "content": message_text(message.get("content"), i)})
        if not getattr(self.tokenizer, "chat_template", None):
            raise SpecdecError(
                "this tokenizer has no chat template, so chat messages cannot be rendered",
                "pass a plain text prompt (--raw in the CLI)",
            )
        go_on = rendered[-1]["role"] == "assistant"
        text = self.tokenizer.apply_chat_template(
            rendered, add_generation_prompt=not go_on, continue_final_message=go_on, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise SpecdecError(f"{what} needs a tokenizer", "pass tokenizer= to SpeculativeGenerator or give token ids")

    def eos_token_ids(self) -> set[int]:
        """Every EOS id of the target's generation config (else the tokenizer's)."""
        return eos_token_ids(self.target, self.tokenizer)

    # ------------------------------------------------------------------ API
    def generate(self, prompt: Prompt, max_new_tokens: int = 128, **kwargs: Any) -> GenerationResult:
        """Generate and return the whole result. Keyword arguments are those of :meth:`stream`."""
        tokens: list[int] = []
        texts: list[str] = []
        event = None
        for event in self.stream(prompt, max_new_tokens=max_new_tokens, **kwargs):
            tokens.extend(event.token_ids)
            texts.append(event.text)
        assert event is not None
        return GenerationResult(
            token_ids=tokens,
            text="".join(texts) if self.tokenizer is not None else None,
            stats=event.stats,
            finish_reason=event.finish_reason or "length",
            prompt_ids=self._last_prompt_ids,
        )

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        suppress_tokens: Sequence[int] = (),
    ) -> Iterator[StreamEvent]:
        """Generate incrementally; each event carries the new stable text and new token ids.

        Args:
            prompt: text, chat messages or token ids.
            max_new_tokens: most tokens to generate.
            temperature: 0 for greedy, else sampling temperature.
            top_k: keep the k most likely tokens (0 = off).
            top_p: nucleus sampling mass (1 = off).
            repetition_penalty: transformers-style penalty on tokens already seen (1 = off).
            seed: seed of the random draws (None = random).
            stop: stop string(s): generation ends and the text is cut before it.
            eos_token_id: EOS ids to stop at instead of the model's (``[]`` = never stop at EOS).
            suppress_tokens: ids never generated (e.g. a banned EOS).
        """
        prompt_ids = self.encode(prompt)
        cfg, stops, eos = check_request(
            self.target,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            suppress_tokens=suppress_tokens,
            stop=stop,
            seed=seed,
            eos_token_id=eos_token_id,
        )
        if stops and self.tokenizer is None:
            raise SpecdecError("stop strings need a tokenizer", "pass tokenizer= or use eos_token_id")
        if not prompt_ids:
            raise SpecdecError("the prompt is empty", "give at least one token of prompt")
        self._check_context(len(prompt_ids), max_new_tokens)
        if eos is None:
            eos = self.eos_token_ids()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else random.randrange(2**63))
        return self._exclusive(
            self._run(prompt_ids, max_new_tokens, cfg, generator, stops, eos, seeded=seed is not None)
        )

    def _exclusive(self, events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
        """``events`` (one generation), computed only while no other generation of this generator computes, and
        ended with :class:`GeneratorBusyError` when another one started while this stream waited.

        A generation owns the generator's KV caches (the target's, a draft's) from its first event on. Another
        thread's generation meanwhile, or a new stream started while this one is paused, would compute on the
        same caches: the text would silently be wrong. One generator decodes one generation at a time (the server
        and the webui extension queue their requests); use one generator per thread.
        """
        mine = None
        try:
            while True:
                if not self._busy.acquire(blocking=False):
                    raise GeneratorBusyError(
                        "this generator is computing another generation (in another thread)",
                        "generate with one generator per thread, or one generation after the other",
                    )
                try:
                    if mine is None:
                        self._generation += 1
                        mine = self._generation
                    elif self._generation != mine:
                        raise GeneratorBusyError(
                            "this stream was paused while another generation of the same generator ran, and that "
                            "generation took over the KV cache this one was decoding with",
                            "finish or close a stream before starting the next generation with the same generator",
                        )
                    event = next(events, None)
                finally:
                    self._busy.release()
                if event is None:
                    return
                yield event
        finally:
            events.close()

    # ------------------------------------------------------------------ the loop
    def _run(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        cfg: SamplingConfig,
        generator: torch.Generator,
        stops: list[str],
        eos: set[int],
        seeded: bool = False,
    ) -> Iterator[StreamEvent]:
        stats = GenerationStats(
            method=self.method,
            prompt_tokens=len(prompt_ids),
            static_cache=self.static_cache,
            compile_steps=self.compile_steps,
        )
        self.last_stats = stats
        self._last_prompt_ids = prompt_ids  # here, not in stream(): set only by the generation that runs
        buf = torch.empty(len(prompt_ids) + max_new_tokens + 1, dtype=torch.long, device=self.device)
        buf[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        length = len(prompt_ids)
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        matcher = StopStringMatcher(stops)
        start, paused = time.perf_counter(), 0.0
        state = DecodeState(
            tokens=buf[:length],
            prompt_length=len(prompt_ids),
            sampling=cfg,
            generator=generator,
            seeded=seeded,
            capacity=len(prompt_ids) + max_new_tokens + max(BUCKETS),
            reduced_precision=self.target.dtype in (torch.float16, torch.bfloat16),
            cost_kind=self.cost_kind,
        )
        stats.cached_tokens = self.kv.start(state.capacity, prompt_ids)
        with torch.inference_mode():
            stats.graph_capture_seconds = self._prefill(state, stats.cached_tokens)
            self.proposer.reset(state)  # a draft model prefills here
        stats.prefill_seconds = time.perf_counter() - start
        finish: str | None = None
        while finish is None:
            generated = length - len(prompt_ids)
            budget = min(max_new_tokens - generated - 1, self.context_length - length - 1)
            with torch.inference_mode():
                proposal = self.proposer.propose(state, max(budget, 0))
                new_tokens, outcome = self._step(proposal, state, cfg, generator)
            stats.graph_capture_seconds += outcome.capture_seconds + proposal.capture_seconds
            stats.steps += 1
            stats.proposed += proposal.num_nodes
            stats.accepted += len(outcome.accepted_nodes)
            keep = new_tokens.tolist()[: max_new_tokens - generated]
            for i, t in enumerate(keep):
                if t in eos:
                    keep, finish = keep[: i + 1], "eos"
                    break
            text = ""
            if decoder is not None:
                last = finish is not None or generated + len(keep) >= max_new_tokens
                text, used = detokenize(decoder, matcher, keep, last)
                if used is not None:  # a stop string: the tokens after the one completing it are not generated
                    keep, finish = keep[:used], "stop"
            buf[length : length + len(keep)] = torch.tensor(keep, dtype=torch.long)
            length += len(keep)
            state.tokens = buf[:length]
            self.kv.remember(state.tokens[:-1])
            outcome.tokens = state.tokens
            if finish is None:
                with torch.inference_mode():
                    self.proposer.observe(outcome)
            if finish is None and length - len(prompt_ids) >= max_new_tokens:
                finish = "length"
            if finish is not None and finish != "stop":
                text += matcher.finish()
            stats.new_tokens = length - len(prompt_ids)
            stats.seconds = time.perf_counter() - start - paused
            stats.compile_steps = self.compile_steps  # False from a failed compile on
            handed = time.perf_counter()
            yield StreamEvent(
                text=text, token_ids=keep, stats=replace(stats), done=finish is not None, finish_reason=finish
            )
            paused += time.perf_counter() - handed  # the caller's time with the event is not decoding time

    def _prefill(self, state: DecodeState, cached: int) -> float:
        """Cache the prompt before the pending token, but for its first ``cached`` tokens (kept from the
        previous generation): one causal forward, no mask, no hidden states. Returns the seconds it spent
        capturing a graph or compiling the step.

        Steps then hold only their own rows, so a long prompt costs what plain
        decoding's prefill costs whatever the method (no prompt-sized tree mask).
        """
        captured = 0.0
        if state.tokens.numel() - 1 > cached:
            captured = self.kv.forward(state.tokens[cached:-1], keep=1).captured
        self.kv.remember(state.tokens[:-1])
        return captured

    def _step(
        self, proposal: Proposal, state: DecodeState, cfg: SamplingConfig, generator: torch.Generator
    ) -> tuple[torch.Tensor, StepOutcome]:
        """One target forward over the pending token (the root) and the proposal; verify; keep the accepted KV.

        Returns ``[a+1]`` new tokens and the outcome for the proposer.
        """
        base = state.tokens.numel() - 1  # position of the pending token (the root)
        n, m = proposal.num_nodes, proposal.num_extra
        parts = [state.tokens[base:], proposal.tokens.to(self.device)]
        if m:
            parts.append(proposal.extra_tokens.to(self.device))
        q = 1 + n + m  # rows of the forward, all of whose logits are needed
        positions = allowed = None
        if not proposal.is_chain or m:
            positions, allowed = self._tree_inputs(proposal, base)
        t0 = time.perf_counter()
        out = self.kv.forward(torch.cat(parts), positions, allowed, keep=q, hidden=proposal.need_hidden)
        logits = out.logits  # [1+n+m, V]
        verdict = verify(proposal, logits[: 1 + n], cfg, state.tokens, generator, typical=self.typical_acceptance)
        verify_seconds = time.perf_counter() - t0 - out.captured
        self.kv.keep_rows(base, [0] + [1 + i for i in verdict.accepted_nodes])
        accepted = proposal.tokens[verdict.accepted_nodes].to(self.device)  # [a]; empty when nothing was accepted
        new_tokens = torch.cat([accepted, torch.tensor([verdict.next_token], device=self.device)])
        outcome = StepOutcome(
            proposal=proposal,
            accepted_nodes=verdict.accepted_nodes,
            new_tokens=new_tokens,
            tokens=state.tokens,
            logits=logits,
            hidden=out.hidden,
            last_row=verdict.last_row,
            verify_seconds=verify_seconds,
            capture_seconds=out.captured,
        )
        return new_tokens, outcome

    @staticmethod
    def _tree_inputs(proposal: Proposal, base: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[q]`` and the visibility ``[q, q]`` (bool) among the step's rows for a tree and extra rows.

        Every row sees the whole cache; among the step's rows (root, nodes,
        extra rows) it sees what the tree (or ``extra_mask``) allows.
        """
        n, m = proposal.num_nodes, proposal.num_extra
        q = 1 + n + m
        parents = proposal.parents if proposal.parents is not None else torch.arange(-1, n - 1)
        offsets = [torch.zeros(1, dtype=torch.long), depths(parents.cpu())]
        allowed = torch.zeros(q, q, dtype=torch.bool)
        allowed[: 1 + n, : 1 + n] = ancestor_mask(parents.cpu())
        if m:
            offsets.append(proposal.extra_positions.cpu().long())
            allowed[1 + n :] = proposal.extra_mask.cpu()
        return base + torch.cat(offsets), allowed

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.context_length:
            room = self.context_length - prompt_len
            raise ContextLengthError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {self.context_length} tokens",
                f"shorten the prompt or set max_new_tokens to at most {room}" if room > 0 else "shorten the prompt",
            )
