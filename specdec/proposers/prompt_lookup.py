"""Method ``prompt_lookup``: candidates copied from the context after a matching n-gram.

The context's n-grams are indexed (:class:`~specdec.ngrams.NgramIndex`), so a
lookup costs one dict access per n instead of a rescan of the context; longer
matches are tried first. How many tokens to copy comes from the acceptance
rate and the measured step costs (:class:`~specdec.adaptive.DraftLengthController`),
and doubles while copies are kept whole.
"""

from __future__ import annotations


import torch

from ..adaptive import DraftLengthController
from ..ngrams import NgramIndex, next_copy_length
from ..tree import build_trie, children
from .base import DecodeState, Proposal, StepOutcome
from .options import PromptLookupOptions


K_MAX = 10  # most candidates per step the length controller chooses (a fixed num_speculative_tokens overrides it)


class PromptLookupProposer:
    name = "prompt_lookup"

    def __init__(self, cfg: PromptLookupOptions, fixed: int | None) -> None:
        self.cfg = cfg
        self.controller = DraftLengthController(
            fixed=fixed,
            k_max=K_MAX,
            initial_k=K_MAX,
            draft_seconds=0.0,
            static_draft_cost=0.0,
        )
        self.index = NgramIndex(cfg.min_ngram, cfg.max_ngram)
        self._shadow: int | None = None  # first token a match offered when nothing was proposed
        self.run_length = K_MAX  # copy length while copies are kept whole

    def reset(self, state: DecodeState) -> None:
        self.controller.start(deterministic=state.timing_free, cost_kind=state.cost_kind)
        self.index = NgramIndex(self.cfg.min_ngram, self.cfg.max_ngram)
        self.index.extend(state.tokens.tolist())
        self._shadow = None
        self.run_length = K_MAX

    def propose(self, state: DecodeState, max_nodes: int) -> Proposal:
        k = self.controller.choose()
        if k and self.controller.fixed is None:
            k = max(k, self.run_length)
        k = min(k, max_nodes)
        device = state.tokens.device
        if k == 0:
            found = self.index.lookup(1) if max_nodes > 0 else []
            self._shadow = found[0] if found else None
            return Proposal.empty(device)
        self._shadow = None
        # copies sized by the controller's measured costs, not by copy_length: measured side by side, the
        # agreement sizing was 1.005x on qwen-coder-1.5b (bf16) and 0.87x on smollm2-135m (fp32) here
        branches = 1 if self.controller.fixed is not None else self.cfg.branches
        found = self.index.lookup_many(k, branches, self.cfg.branch_tokens)
        if found and self.controller.fixed is None:
            rows = 1 + len(build_trie(found, k)[0]) if len(found) > 1 else 1 + len(found[0])
            if not self.controller.pays(len(found[0]), rows):  # measured: a plain step is faster
                self._shadow = found[0][0]
                return Proposal.empty(device)
        if len(found) <= 1:
            return Proposal(tokens=torch.tensor(found[0] if found else [], dtype=torch.long, device=device))
        tokens, parents = build_trie(found, k)
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            parents=torch.tensor(parents, dtype=torch.long, device=device),
        )

    def observe(self, outcome: StepOutcome) -> None:
        n = outcome.proposal.num_nodes
        self.controller.record_verify(1 + n, outcome.verify_seconds)
        if n:
            main = self._main_branch(outcome.proposal)
            self.controller.record_step(len(main), len(outcome.accepted_nodes))
            longest = max(self.cfg.max_copy_tokens, K_MAX)
            self.run_length = next_copy_length(main, outcome.new_tokens.tolist(), self.run_length, longest)
        elif self._shadow is not None:
            self.controller.record_step(1, int(int(outcome.new_tokens[0]) == self._shadow))
        self.index.extend(outcome.tokens[len(self.index.tokens) :].tolist())

    @staticmethod
    def _main_branch(draft: Proposal) -> list[int]:
        """The first (full-length) branch: node 0 and its first-born descendants."""
        tokens = draft.tokens.tolist()
        if draft.parents is None:
            return tokens
        kids = children(draft.parents)  # kids[1 + i]: children of node i, first-born first
        path, node = [tokens[0]], 0
        while kids[1 + node]:
            node = kids[1 + node][0]
            path.append(tokens[node])
        return path


def build(ctx) -> PromptLookupProposer:
    return PromptLookupProposer(ctx.options, ctx.num_speculative_tokens)
