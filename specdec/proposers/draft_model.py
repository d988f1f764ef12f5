"""Method ``draft``: a small model of the same tokenizer proposes a chain.

The draft keeps its own KV cache in step with the committed tokens: after a
step it is cropped to the accepted prefix, and the next proposal first feeds
the committed tokens the draft has not seen (the recovered/bonus token and,
when all were accepted, the last candidate); from one generation to the next
it keeps what the new prompt shares with the last one (a chat's earlier turns,
:meth:`~specdec.kvcache.KVCache.start`). The chain length comes from a
:class:`~specdec.adaptive.DraftLengthController` (measured draft and verify
costs, running acceptance rate) unless fixed.

Two ways to spend less on the draft, both lossless (they only change what is
proposed, never how it is verified):

- *n-grams first*: when the context already contains the current suffix
  followed by at least ``ngram_min_tokens`` tokens (copying, editing), those
  tokens are proposed as point-mass candidates and the draft model is not run
  this step; it catches up on the next one in a single forward. A copy is
  used only while copies pay: the proposer keeps moving averages of tokens
  per unit of cost for copy steps and for draft steps, and a copy that was
  not used is still scored against the tokens the step produced (free), so
  copies come back when the text starts repeating. The copy length doubles
  while copies are kept whole (up to ``max_copy_tokens``).
- *confidence stop*: drafting stops early once the draft's own probability of
  its token falls below ``confidence_stop``.

Where an extra target row is nearly free (a GPU), greedy decoding drafts a
*tree* instead of a chain (:class:`DraftTree`): at each depth one draft forward
over the :data:`TREE_BEAM` likeliest nodes (by the product of the draft's
probabilities along their path) offers each one's :data:`TREE_WIDTH` likeliest
tokens, until even the likeliest path is less likely than ``confidence_stop``;
the ``tree_nodes`` likeliest nodes of all are verified. As many draft forwards
as a chain of the same depth, and a rejected token often has the target's
choice beside it. Where the context offers a copy (text that repeats), a chain
is drafted instead: it checks the copy in its own forwards, several tokens per
forward, where a tree runs one forward per depth.

And two ways to make each draft token cheaper, lossless for the same reason:
on a CPU the draft runs as an int8 weight-only copy (:mod:`specdec.compact`),
~1.6x faster per token for the 0.5B draft measured here; and under greedy
decoding each draft forward also checks a context copy of the drafted text
(``GUESS_START`` tokens, doubling while all are taken), so text the draft
would copy costs one draft forward for several tokens.
"""

from __future__ import annotations

import math
import time

import torch

from .. import compact, costs
from ..adaptive import DraftLengthController, ema
from ..errors import SpecdecError
from ..kvcache import Forward
from ..modelinfo import output_rows
from ..ngrams import NgramIndex, common_prefix, next_copy_length
from ..sampling import choose, presence_rows, process_logits
from ..static import BUCKETS, open_cache
from ..tree import ancestor_mask
from .base import DecodeState, Proposal, StepOutcome
from .options import DRAFT_TREE_ROWS, DraftOptions

VALUE_DECAY = 0.3  # weight of the newest step in the copy/draft value averages
GUESS_MIN_NGRAM = 1  # shortest suffix of the drafted text matched for a copy the draft checks (a lone
# one-token match offers at most SHORT_COPY tokens: see ngrams.copy_length)
GUESS_START = 3  # copied tokens the draft checks at first; doubles while all are taken
MAX_GUESS_TOKENS = 16
TREE_BEAM = 4  # nodes of a draft tree expanded per depth: the likeliest by path probability
TREE_WIDTH = 4  # tokens each expanded node offers: the draft's likeliest
TREE_MAX_DEPTH = max(BUCKETS) // TREE_BEAM  # so that a depth's forward (its nodes and their ancestors) fits a bucket
TREE_MAX_COST = 1.25  # trees are drafted by default where a DRAFT_TREE_ROWS-row forward costs at most this x one row


def tree_nodes(cfg: DraftOptions, cost_kind: str) -> int:
    """Nodes of the draft tree verified per greedy step on a target of ``cost_kind``; 0 = a chain.

    ``cfg.tree_nodes`` when given; else ``DRAFT_TREE_ROWS - 1`` where the kind's prior row costs
    (:func:`specdec.costs.prior`) make a ``DRAFT_TREE_ROWS``-row forward cost at most
    :data:`TREE_MAX_COST` x one row (a GPU), else 0 (a CPU, where rows cost their share).
    """
    if cfg.tree_nodes is not None:
        return cfg.tree_nodes
    prior = costs.prior(cost_kind, monotone=True)
    return DRAFT_TREE_ROWS - 1 if prior(DRAFT_TREE_ROWS) <= TREE_MAX_COST * prior(1) else 0


class DraftTree:
    """A draft tree being grown: nodes with their token, parent, depth and log path probability.

    Nodes are appended parents first; ``-1`` is the root (the pending token).
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.scores: list[float] = []

    def offer(self, parents: list[int], logprobs: torch.Tensor, width: int) -> None:
        """Add each of ``parents``' ``width`` likeliest tokens; ``logprobs``: ``[len(parents), V]`` the draft's
        log-probabilities there (one top-k and one copy to the host for them all)."""
        top = logprobs.topk(min(width, logprobs.shape[-1]), dim=-1)
        for parent, lps, tokens in zip(parents, top.values.tolist(), top.indices.tolist()):
            base = self.scores[parent] if parent >= 0 else 0.0
            depth = self.depths[parent] + 1 if parent >= 0 else 1
            for lp, token in zip(lps, tokens):
                if lp == float("-inf"):
                    break  # a suppressed token
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(depth)
                self.scores.append(base + lp)

    def frontier(self, depth: int, beam: int) -> list[int]:
        """The ``beam`` likeliest nodes at ``depth``, likeliest first."""
        at = [i for i, d in enumerate(self.depths) if d == depth]
        return sorted(at, key=lambda i: -self.scores[i])[:beam]

    def with_ancestors(self, nodes: list[int]) -> list[int]:
        """``nodes`` (all at one depth) and their ancestors: the ancestors shallowest first, then ``nodes`` in
        their order."""
        order = {node: j for j, node in enumerate(nodes)}
        seen: set[int] = set()
        for node in nodes:
            while node >= 0 and node not in seen:
                seen.add(node)
                node = self.parents[node]
        return sorted(seen, key=lambda i: (i in order, self.depths[i], order.get(i, i)))

    def best(self, n: int) -> tuple[list[int], list[int]]:
        """The ``n`` likeliest nodes as ``(tokens, parents)`` in topological order (a parent before its
        children, siblings likeliest first). A node is never likelier than its parent, so the choice
        holds every chosen node's ancestors."""
        chosen = sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], self.depths[i], i))[:n]
        chosen.sort(key=lambda i: (self.depths[i], -self.scores[i], i))
        index = {node: j for j, node in enumerate(chosen)}
        return [self.tokens[i] for i in chosen], [index.get(self.parents[i], -1) for i in chosen]

    def visibility(self, rows: list[int]) -> torch.Tensor:
        """``[t, t]`` bool: which of ``rows`` (closed under ancestors, parents first, as :meth:`with_ancestors`
        gives them) each one sees: itself and its ancestors (:func:`specdec.tree.ancestor_mask` without the root)."""
        index = {node: j for j, node in enumerate(rows)}
        return ancestor_mask(torch.tensor([index.get(self.parents[i], -1) for i in rows]))[1:, 1:]


class DraftModelProposer:
    name = "draft"

    def __init__(
        self,
        draft: torch.nn.Module,
        target_vocab: int,
        controller: DraftLengthController,
        cfg: DraftOptions,
        static_cache: bool = False,
        prefix_cache: bool = True,
        compile_steps: bool = False,
    ) -> None:
        self.model = draft
        self.target_vocab = target_vocab
        self.controller = controller
        self.cfg = cfg
        self.kv = open_cache(draft, static=static_cache, compile_steps=compile_steps)
        self.kv.reuse = prefix_cache
        self.cached = 0  # committed tokens whose KV is in the draft cache
        self._unfed = 0  # drafted tokens whose KV is in the draft cache
        self._ran = False  # whether the draft model ran for the current step
        self._forwards = 0  # draft forwards of the current step (a chain: its tokens)
        self._tree = False  # whether the current step verifies a draft tree
        self.tree_nodes = 0  # nodes of a draft tree in this generation (0 = chains)
        self._idle = 0  # steps in which the controller chose not to draft
        self._captured = 0.0  # seconds of graph capture or compile not yet handed on with a proposal
        self.index: NgramIndex | None = None
        self.copy_length = cfg.ngram_tokens
        self._copy: list[int] = []  # the n-gram copy proposed (or, if unused, scored) this step
        self.guess_length = GUESS_START  # context-copied tokens the draft checks in its next forward
        self.copy_value: float | None = None  # moving averages of tokens per unit of step cost
        self.draft_value: float | None = None

    def reset(self, state: DecodeState) -> None:
        # seeded sampling must not depend on measured times (see DraftLengthController)
        self.controller.start(deterministic=state.timing_free, cost_kind=state.cost_kind)
        self.device = next(self.model.parameters()).device
        self.tree_nodes = tree_nodes(self.cfg, state.cost_kind)
        self._prefill(state)
        self._unfed = self._idle = 0
        self.index = None
        self.copy_length = self.cfg.ngram_tokens
        self._copy = []
        self.guess_length = GUESS_START
        if self.controller.deterministic:
            self.copy_value = self.draft_value = None
        if self.cfg.ngram_first:
            self.index = NgramIndex(1, self.cfg.max_ngram)
            self.index.extend(state.tokens.tolist())

    def _prefill(self, state: DecodeState) -> None:
        """Cache the prompt before the pending token, as the target does, but for what the draft cache
        kept from the last generation (a chat's earlier turns).

        The pending token is then always the first row of the first draft forward, whatever was kept,
        so that in reduced precision a repeated request drafts the very same tokens.
        """
        prompt = state.tokens
        kept = self.kv.start(state.capacity, prompt.tolist())
        if prompt.numel() - 1 > kept:
            self._forward(prompt[kept:-1].to(self.device), keep=1)
        self.cached = prompt.numel() - 1
        self.kv.remember(prompt[: self.cached])

    def _forward(self, *args, **kwargs) -> Forward:
        """The draft cache's forward; the seconds it spent capturing or compiling are counted apart."""
        out = self.kv.forward(*args, **kwargs)
        self._captured += out.captured
        return out

    def _record_draft(self, t0: float, captured: float) -> None:
        """Tell the controller the seconds per draft forward since ``t0``, less the capture or compile
        seconds counted since ``captured`` (one-time work, not a draft step's cost)."""
        seconds = time.perf_counter() - t0 - (self._captured - captured)
        self.controller.record_draft(seconds / self._forwards)

    def propose(self, state: DecodeState, max_nodes: int) -> Proposal:
        proposal = self._propose(state, max_nodes)
        proposal.capture_seconds, self._captured = self._captured, 0.0
        return proposal

    def _propose(self, state: DecodeState, max_nodes: int) -> Proposal:
        self._unfed, self._ran, self._tree = 0, False, False
        if max_nodes <= 0:
            return Proposal.empty(state.tokens.device)
        self._copy = []
        fixed = self.controller.fixed
        copied: list[int] = []
        if self.index is not None:
            limit = min(
                max(self.copy_length, self.cfg.ngram_min_tokens), max_nodes, max_nodes if fixed is None else fixed
            )
            copied = self.index.lookup(limit)
            if len(copied) >= self.cfg.ngram_min_tokens:
                self._copy = copied
                if self._copy_pays():
                    return Proposal(tokens=torch.tensor(copied, dtype=torch.long, device=state.tokens.device))
        k = self.controller.choose()
        if k == 0 and fixed is None:  # drafting looks unprofitable; still probe now and then
            self._idle += 1
            k = 1 if self._idle % 16 == 0 else 0
        k = min(k, max_nodes)
        if k <= 0:
            return Proposal.empty(state.tokens.device)
        if (
            self.tree_nodes > 1
            and state.sampling.greedy
            and not state.sampling.uses_prefix
            and len(copied) < self.cfg.ngram_min_tokens  # text that repeats: a chain checks copies in its forwards
        ):
            return self._draft_tree(state, min(fixed or self.controller.k_max, max_nodes, TREE_MAX_DEPTH))
        return self._draft_chain(state, k)

    def _draft_tree(self, state: DecodeState, depth: int) -> Proposal:
        """Grow a :class:`DraftTree` at most ``depth`` deep (greedy decoding) and propose its ``tree_nodes``
        likeliest nodes.

        The first forward feeds the committed tokens the draft has not seen and offers the root's
        children; each later one runs over the depth's :data:`TREE_BEAM` likeliest nodes and their
        ancestors (the cache holds only committed tokens, so a node sees just its own path) and offers
        their children. The tree stops growing once its likeliest node at a depth has a path
        probability below ``confidence_stop`` (the chain's rule, for a path). The cache is cut back to
        the committed tokens afterwards: the accepted ones are fed with the next step's first forward.
        """
        self._ran, self._tree, self._forwards = True, True, 1
        committed = state.tokens.numel()
        tree = DraftTree()
        t0, captured = time.perf_counter(), self._captured
        logits = self._forward(state.tokens[self.cached :].to(self.device), keep=1).logits
        tree.offer([-1], self._logprobs(logits, state), TREE_WIDTH)
        for d in range(1, depth):
            grow = tree.frontier(d, TREE_BEAM)
            if not grow or math.exp(tree.scores[grow[0]]) < self.cfg.confidence_stop:
                break  # even the likeliest path this deep is unlikely: the next depth would not pay
            self._forwards += 1
            rows = tree.with_ancestors(grow)
            self.kv.truncate(committed)
            tokens = torch.tensor([tree.tokens[i] for i in rows], dtype=torch.long, device=self.device)
            positions = torch.tensor([committed - 1 + tree.depths[i] for i in rows], device=self.device)
            out = self._forward(tokens, positions, tree.visibility(rows).to(self.device), keep=len(grow))
            tree.offer(grow, self._logprobs(out.logits, state), TREE_WIDTH)
        self.kv.truncate(committed)
        self._record_draft(t0, captured)
        self.cached = committed
        self.kv.remember(state.tokens[:committed])
        tokens, parents = tree.best(self.tree_nodes)
        device = state.tokens.device
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            parents=torch.tensor(parents, dtype=torch.long, device=device),
        )

    def _logprobs(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """``[r, V]`` the draft's log-probabilities from its raw logits ``[r, Vd]`` (greedy processing)."""
        processed = process_logits(logits[:, : self.target_vocab], state.sampling, None)
        return torch.log_softmax(processed.float(), dim=-1)

    def _draft_chain(self, state: DecodeState, k: int) -> Proposal:
        """Run the draft model for up to ``k`` tokens (fewer on a confidence stop).

        Under plain greedy decoding each draft forward also checks a context
        copy of the drafted text (:meth:`_guess`): the copied tokens the draft
        itself would have picked are taken at once, so one draft forward can
        yield several draft tokens. The tokens are the draft's greedy choices
        either way; only the number of draft forwards changes.
        """
        cfg = state.sampling
        self._ran = True
        committed = state.tokens.numel()
        feed = state.tokens[self.cached :].to(self.device)
        guessing = self.index is not None and cfg.greedy and not cfg.uses_prefix
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        t0, captured = time.perf_counter(), self._captured
        while len(drafted) < k:
            guess = self._guess(state, drafted, k - len(drafted) - 1) if guessing else []
            if guess:
                feed = torch.cat([feed, torch.tensor(guess, dtype=torch.long, device=self.device)])
            logits = self._forward(feed, keep=1 + len(guess)).logits[:, : self.target_vocab]  # [1+g, Vd]
            if guessing:
                picks = self._take_guess(logits, guess)
            else:
                presence = None
                if cfg.uses_prefix:
                    context = torch.cat(
                        [state.tokens.to(self.device), torch.tensor(drafted, dtype=torch.long, device=self.device)]
                    )
                    presence = presence_rows(context, logits.shape[-1])
                processed = process_logits(logits, cfg, presence)
                token = int(choose(processed, cfg, state.generator)[0])
                confident = (
                    self.cfg.confidence_stop <= 0
                    or self._confidence(processed[0], token, cfg.greedy) >= self.cfg.confidence_stop
                )
                picks = [(token, confident)]
                if not cfg.greedy:
                    probs.append(processed[0])
            stop = False
            for token, confident in picks[: k - len(drafted)]:
                drafted.append(token)
                if not confident:
                    stop = True
                    break
            if guess:  # drop the KV of copied tokens the draft did not take
                self.kv.truncate(committed + len(drafted) - 1)
            if stop:
                break
            feed = torch.tensor([drafted[-1]], dtype=torch.long, device=self.device)
        self._forwards = len(drafted)
        self._record_draft(t0, captured)
        self.cached = committed
        self.kv.remember(state.tokens[:committed])
        self._unfed = len(drafted) - 1  # the last drafted token was never fed
        draft_probs = None
        if probs:
            draft_probs = torch.stack(probs)
            if draft_probs.shape[-1] < self.target_vocab:
                draft_probs = torch.nn.functional.pad(draft_probs, (0, self.target_vocab - draft_probs.shape[-1]))
        return Proposal(
            tokens=torch.tensor(drafted, dtype=torch.long, device=state.tokens.device), draft_probs=draft_probs
        )

    def _guess(self, state: DecodeState, drafted: list[int], room: int) -> list[int]:
        """Up to ``room`` tokens that followed the latest earlier occurrence of the drafted text's end."""
        length = min(self.guess_length, room)
        if length <= 0:
            return []
        tail = state.tokens[-self.cfg.max_ngram :].tolist() + drafted
        found = self.index.lookup_many(length, 1, suffix=tail, min_n=GUESS_MIN_NGRAM, limit=length)
        return found[0] if found else []

    def _take_guess(self, logits: torch.Tensor, guess: list[int]) -> list[tuple[int, bool]]:
        """The draft's greedy tokens from rows ``[1+g, V]``: its pick after the fed text, then after
        each copied token it agreed with. Returns ``(token, confident)`` pairs; adapts the copy length."""
        tokens = logits.argmax(dim=-1).tolist()  # [1+g]
        kept = common_prefix(guess, tokens)
        if guess:
            self.guess_length = next_copy_length(guess, tokens, self.guess_length, MAX_GUESS_TOKENS)
        floor = self.cfg.confidence_stop
        if floor <= 0:
            return [(t, True) for t in tokens[: kept + 1]]
        probs = torch.softmax(logits[: kept + 1].float(), dim=-1).amax(dim=-1).tolist()  # only the rows taken
        return [(tokens[i], probs[i] >= floor) for i in range(kept + 1)]

    @staticmethod
    def _confidence(processed: torch.Tensor, token: int, greedy: bool) -> float:
        """The draft's probability of ``token``; ``processed``: ``[V]`` logits (greedy) or probabilities."""
        if greedy:
            return float(torch.softmax(processed, dim=-1)[token])
        return float(processed[token])

    def _copy_pays(self) -> bool:
        """Whether a copy step is expected to yield at least as much per unit of cost as a draft step."""
        return self.copy_value is None or self.draft_value is None or self.copy_value >= self.draft_value

    def _score(self, outcome: StepOutcome) -> None:
        """Update the copy and draft values from this step (an unused copy is scored against the new tokens)."""
        c = self.controller
        if not (c.deterministic or c.measured):
            return  # costs not measured yet: values in seconds and in units must not mix
        new = outcome.new_tokens.tolist()
        if self._copy:
            kept = common_prefix(self._copy, new)
            value = (kept + 1) / c.step_cost(0, 1 + len(self._copy))
            self.copy_value = ema(self.copy_value, value, VALUE_DECAY)
            longest = max(self.cfg.max_copy_tokens, self.cfg.ngram_tokens)
            self.copy_length = next_copy_length(self._copy, new, self.copy_length, longest)
        if self._ran:
            rows = 1 + outcome.proposal.num_nodes
            self.draft_value = ema(self.draft_value, len(new) / c.step_cost(self._forwards, rows), VALUE_DECAY)

    def observe(self, outcome: StepOutcome) -> None:
        if self.index is not None:
            self.index.extend(outcome.tokens[len(self.index.tokens) :].tolist())
        n = outcome.proposal.num_nodes
        self.controller.record_verify(1 + n, outcome.verify_seconds)
        self._score(outcome)
        if not self._ran:
            return  # an n-gram (or empty) step: the draft cache is unchanged and catches up next time
        if self._tree:  # scored as a chain as deep as the tree; the cache already holds committed tokens only
            self.controller.record_step(self._forwards, min(len(outcome.accepted_nodes), self._forwards))
            return
        self.controller.record_step(n, len(outcome.accepted_nodes))
        valid = self.cached + min(len(outcome.accepted_nodes), self._unfed)
        self.kv.truncate(valid)
        self.cached = valid
        self.kv.remember(outcome.tokens[:valid])


def build(ctx) -> DraftModelProposer:
    cfg: DraftOptions = ctx.options
    target_vocab = output_rows(ctx.target)
    ratio = _parameters(ctx.draft) / max(_parameters(ctx.target), 1)
    draft = ctx.draft
    if cfg.int8 is not False and compact.int8_available(draft):
        draft = compact.int8_draft(draft)
        ratio *= 0.6  # measured 0.5B draft, CPU bf16: ~1.6x faster per token
    elif cfg.int8:
        raise SpecdecError("int8 drafting needs the draft on a CPU in bf16, fp16 or fp32", "leave int8 unset")
    controller = DraftLengthController(fixed=ctx.num_speculative_tokens, static_draft_cost=ratio)
    return DraftModelProposer(
        draft,
        target_vocab,
        controller,
        cfg,
        static_cache=ctx.static_cache,
        prefix_cache=ctx.prefix_cache,
        compile_steps=ctx.compile_steps,
    )


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
