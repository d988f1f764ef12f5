"""Method ``none``: no candidates, so every step is one plain decoding step.

The in-house baseline: the same loop, verifier and cache as every other method.
"""

from __future__ import annotations

from .base import DecodeState, Proposal, StepOutcome


class NoProposer:
    name = "none"

    def reset(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, max_nodes: int) -> Proposal:
        return Proposal.empty(state.tokens.device)

    def observe(self, outcome: StepOutcome) -> None:
        pass


def build(ctx) -> NoProposer:
    return NoProposer()
