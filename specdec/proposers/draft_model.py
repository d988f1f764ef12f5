"""Method ``draft``: a small model of the same tokenizer proposes a chain.

The draft keeps its own KV cache in step with the committed tokens: after a
step it is cropped to the accepted prefix, and the next proposal first feeds
the committed tokens the draft has not seen (the recovered/bonus token and,
when all were accepted, the last candidate). The chain length comes from a
:class:`~specdec.adaptive.DraftLengthController` (measured draft and verify
costs, running acceptance rate) unless fixed.
"""
from __future__ import annotations

import time

import torch

from .. import kvcache
from ..adaptive import DraftLengthController
from ..sampling import choose, presence_rows, process_logits
from .base import DecodeState, Draft, StepOutcome


class DraftModelProposer:
    name = "draft"

    def __init__(self, draft: torch.nn.Module, target_vocab: int, controller: DraftLengthController) -> None:
        self.model = draft
        self.target_vocab = target_vocab
        self.controller = controller
        self.cache = kvcache.new_cache(draft)
        self.cached = 0  # committed tokens whose KV is in the draft cache

    def reset(self, state: DecodeState) -> None:
        # seeded sampling must not depend on measured times (see DraftLengthController)
        self.controller.deterministic = state.seeded and not state.sampling.greedy
        self.cache = kvcache.new_cache(self.model)
        self.cached = 0
        self.device = next(self.model.parameters()).device

    def propose(self, state: DecodeState, max_nodes: int) -> Draft:
        k = min(self.controller.choose(), max_nodes)
        if k <= 0:
            return Draft.empty(state.tokens.device)
        cfg = state.sampling
        feed = state.tokens[self.cached :].to(self.device)
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        t0 = time.perf_counter()
        for i in range(k):
            out = self.model(input_ids=feed[None], cache=self.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1:, : self.target_vocab]  # [1, Vd]
            presence = None
            if cfg.uses_prefix:
                context = torch.cat([state.tokens.to(self.device), torch.tensor(drafted, dtype=torch.long, device=self.device)])
                presence = presence_rows(context, logits.shape[-1])
            processed = process_logits(logits, cfg, presence)
            token = int(choose(processed, cfg, state.generator)[0])
            drafted.append(token)
            if not cfg.greedy:
                probs.append(processed[0])
            feed = torch.tensor([token], dtype=torch.long, device=self.device)
        self.controller.record_draft((time.perf_counter() - t0) / k)
        # the cache now holds the committed tokens and drafted[:-1]
        self._pending_draft = len(drafted) - 1
        draft_probs = None
        if probs:
            draft_probs = torch.stack(probs)
            if draft_probs.shape[-1] < self.target_vocab:
                draft_probs = torch.nn.functional.pad(draft_probs, (0, self.target_vocab - draft_probs.shape[-1]))
        self.cached = state.tokens.numel()
        return Draft(tokens=torch.tensor(drafted, dtype=torch.long, device=state.tokens.device), draft_probs=draft_probs)

    def observe(self, outcome: StepOutcome) -> None:
        n = len(outcome.accepted_nodes)
        if outcome.draft.num_nodes == 0:
            return
        valid = self.cached + min(n, self._pending_draft)
        kvcache.truncate(self.cache, valid)
        self.cached = valid


def build(ctx) -> DraftModelProposer:
    from . import take_options

    take_options(ctx.options, (), "draft")
    target_vocab = int(ctx.target.get_output_embeddings().weight.shape[0])
    ratio = _parameters(ctx.draft) / max(_parameters(ctx.target), 1)
    controller = DraftLengthController(fixed=ctx.num_speculative_tokens, static_draft_cost=ratio)
    return DraftModelProposer(ctx.draft, target_vocab, controller)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
