"""The proposer protocol: every method is a proposer behind one loop and one verifier.

One decode step (see :mod:`specdec.engine`)::

    proposal = proposer.propose(state, budget)          # 1. candidate tokens
    logits = target forward over [pending] + proposal   # 2. one target forward
    verdict = verify(proposal, logits, sampling)        # 3. accepted + recovered/bonus
    commit KV of the accepted path; proposer.observe(step)   # 4.
    stream the new tokens                                # 5.

Terms: the *pending* token is the last committed token, whose KV is not yet in
the target cache; it is the root (row 0) of every target forward. *Nodes* are
the candidate tokens (rows ``1..n``); a chain is a tree whose node ``i`` has
parent ``i-1``. *Extra rows* (rows ``1+n..``) ride along in the same forward
without being verified, e.g. the lookahead window; their logits go back to the
proposer in :class:`StepOutcome`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..sampling import SamplingConfig


@dataclass
class Proposal:
    """What a proposer offers for one step.

    Attributes:
        tokens: ``[n]`` long, candidate tokens, in topological order (a parent
            before its children; siblings in order of preference).
        parents: ``[n]`` long, index of each node's parent in ``tokens``, ``-1``
            for a child of the root; ``None`` means a chain (``parents[i] = i-1``).
        draft_probs: ``[n, V]`` float32, the (processed) distribution each node
            was sampled from, for sampling verification; ``None`` treats every
            node as a deterministic (point-mass) candidate.
        extra_tokens: ``[m]`` long, unverified rows appended to the forward.
        extra_positions: ``[m]`` long, position of each extra row relative to the
            root's position (the root is at offset 0).
        extra_mask: ``[m, 1+n+m]`` bool, which rows of this forward (root, nodes,
            extra rows) each extra row attends to, besides the whole cache.
            Nodes never attend to extra rows.
        need_hidden: ask the engine for the target's final hidden states.
        capture_seconds: seconds the proposer spent capturing CUDA graphs or compiling steps of its own
            model (a draft's) since its previous proposal, its prefill included: one-time work that the
            engine reports in ``GenerationStats.graph_capture_seconds``.
    """

    tokens: torch.Tensor
    parents: torch.Tensor | None = None
    draft_probs: torch.Tensor | None = None
    extra_tokens: torch.Tensor | None = None
    extra_positions: torch.Tensor | None = None
    extra_mask: torch.Tensor | None = None
    need_hidden: bool = False
    capture_seconds: float = 0.0

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_extra(self) -> int:
        return 0 if self.extra_tokens is None else int(self.extra_tokens.numel())

    @property
    def is_chain(self) -> bool:
        return self.parents is None

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "Proposal":
        return cls(tokens=torch.empty(0, dtype=torch.long, device=device))


@dataclass
class DecodeState:
    """What a proposer may read when proposing.

    Attributes:
        tokens: ``[L]`` long, every committed token (prompt + generated); the
            last one is the pending token.
        prompt_length: number of prompt tokens at the start of ``tokens``.
        sampling: the sampling configuration of this generation.
        generator: the random generator of this generation.
        seeded: whether the caller gave a seed (the run must then be reproducible).
        capacity: most positions this generation's caches hold (prompt, new tokens and the widest step).
        reduced_precision: whether the target computes in float16 or bfloat16, where a position's logits
            depend on how many rows are computed beside it.
        cost_kind: the target's kind of compute, whose prior row costs proposers start from
            (:func:`specdec.costs.cost_kind`: ``"cuda"``, ``"cpu"``, ``"cpu-fp32"``, ``"cpu-emulated"``).
    """

    tokens: torch.Tensor
    prompt_length: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    seeded: bool = False
    capacity: int = 0
    reduced_precision: bool = False
    cost_kind: str = "cpu"

    @property
    def timing_free(self) -> bool:
        """Whether this run's proposals must not depend on measured times, which differ from run to run.

        Seeded sampling must be reproducible. Greedy text in float32 does not depend on what is proposed; in
        float16/bfloat16 it does, through the verify forward's row count (near-ties flip), so greedy decoding
        there proposes from the cost priors alone and the same prompt always gets the same text.
        """
        if self.sampling.greedy:
            return self.reduced_precision
        return self.seeded


@dataclass
class StepOutcome:
    """What happened to a proposal, told to the proposer after the step.

    Attributes:
        proposal: the proposal that was verified.
        accepted_nodes: indices (into ``proposal.tokens``) of the accepted path, in order.
        new_tokens: ``[a+1]`` long, the accepted tokens followed by the recovered
            or bonus token (before any truncation for stops).
        tokens: ``[L']`` long, every committed token after the step.
        logits: ``[1+n+m, V]`` raw target logits of every row of the forward.
        hidden: ``[1+n+m, H]`` target final hidden states (only when the proposal
            asked for them).
        last_row: row of the forward whose logits gave the last new token (the
            root if nothing was accepted, else the last accepted node's row).
        verify_seconds: wall time of the target forward and verification (one-time
            graph capture excluded).
        capture_seconds: time this step spent capturing a CUDA graph.
    """

    proposal: Proposal
    accepted_nodes: list[int]
    new_tokens: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    last_row: int = 0
    verify_seconds: float = 0.0
    capture_seconds: float = 0.0


@runtime_checkable
class Proposer(Protocol):
    """A source of candidate tokens. One module per method implements it."""

    name: str

    def reset(self, state: DecodeState) -> None:
        """Start a new generation; ``state.tokens`` is the prompt."""

    def propose(self, state: DecodeState, max_nodes: int) -> Proposal:
        """Offer candidates continuing ``state.tokens``.

        ``max_nodes`` bounds the depth of the deepest path (for a chain: its
        length), so that accepted + 1 tokens never pass the length or context
        limit; a proposer without its own length setting may use it as a size.
        """

    def observe(self, outcome: StepOutcome) -> None:
        """Learn what was accepted (update caches, pools, hidden states)."""
