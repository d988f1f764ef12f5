"""The one verifier: which candidates to keep, and the one token the target adds.

Terms (see docs/design.md): candidates are *accepted* while they pass; at the first
rejection the target's *recovered* token is sampled from the residual; when a
path is accepted to its leaf, the target adds a *bonus* token. Either way a
step yields ``accepted + 1`` tokens.

- Greedy (``temperature == 0``): a candidate is accepted when it equals the
  target's argmax at its parent's row. Output equals greedy decoding.
- Sampling: at each row the residual starts as ``target_probs``. Children are
  tried in order; child ``x`` with draft distribution ``draft_probs`` (a point
  mass when the proposer gives none) is accepted with probability
  ``min(1, residual[x] / draft_probs[x])``; on rejection
  ``residual = norm(max(0, residual - draft_probs))``. When no child is
  accepted the recovered token is sampled from the residual. For a chain
  with draft-model probabilities this is standard speculative sampling; for
  deterministic candidates (n-grams, tree tops) it is recursive rejection over
  siblings. Each emitted token is distributed exactly as the target's.
- Typical acceptance (LOSSY, opt-in per proposer, sampling only; see
  :class:`TypicalAcceptance`): Medusa's rule (arXiv 2401.10774, sec. 2.3.1)
  accepts a candidate whose target probability is high enough instead of
  sampling against it; greedy decoding ignores it and stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .proposers.base import Proposal
from .sampling import SamplingConfig, presence_rows, process_logits
from .tree import chain_parents, children, path_tokens


@dataclass
class Verdict:
    """Result of verifying one proposal.

    Attributes:
        accepted_nodes: node indices of the accepted path, root first excluded.
        next_token: the recovered or bonus token.
        last_row: forward row whose distribution gave ``next_token``.
    """

    accepted_nodes: list[int]
    next_token: int
    last_row: int


@dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa's *typical acceptance* (LOSSY: output is no longer distributed as the target's).

    Only used when sampling (``temperature > 0``); greedy verification is
    unchanged. At each row, with ``target_probs`` the processed target
    distribution (temperature, top-k/top-p, penalties applied) and ``H`` its
    entropy, a candidate ``x`` passes when::

        target_probs[x] > min(posterior_threshold, posterior_alpha * exp(-H))

    The accepted path is the longest root-to-node path whose every node passes
    (ties: the highest sum of log target probabilities); the token after it
    is sampled from the target's processed distribution at its last row.
    Plausible candidates are kept more often than by exact rejection sampling,
    so more tokens come per step, but the text is not a sample of the target's
    distribution. Never on by default.

    Attributes:
        posterior_threshold: hard probability threshold (Medusa's default 0.09).
        posterior_alpha: scale of the entropy-dependent threshold (Medusa's
            default 0.3, about ``sqrt(posterior_threshold)``).
    """

    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    def __post_init__(self) -> None:
        from .errors import SpecdecError

        if not 0.0 <= self.posterior_threshold <= 1.0:
            raise SpecdecError(f"posterior_threshold must be in [0, 1], got {self.posterior_threshold}")
        if self.posterior_alpha < 0.0:
            raise SpecdecError(f"posterior_alpha must be >= 0, got {self.posterior_alpha}")

    def thresholds(self, target_probs: torch.Tensor) -> torch.Tensor:
        """``[R]`` per-row acceptance threshold of ``target_probs [R, V]``."""
        entropy = -(target_probs * torch.log(target_probs.clamp_min(1e-30))).sum(-1)  # [R]
        return torch.clamp(self.posterior_alpha * torch.exp(-entropy), max=self.posterior_threshold)


def process_rows(logits: torch.Tensor, proposal: Proposal, cfg: SamplingConfig, context: torch.Tensor) -> torch.Tensor:
    """Processed target rows for the root and the nodes.

    Args:
        logits: ``[1+n, V]`` raw target logits of the root and node rows.
        context: ``[L]`` committed tokens (the pending token last).
    Returns:
        ``[1+n, V]`` float32 (processed logits if greedy, else probabilities).
    """
    presence = None
    if cfg.uses_prefix:
        parents = proposal.parents if proposal.parents is not None else chain_parents(proposal.num_nodes, logits.device)
        presence = presence_rows(context, logits.shape[-1], path_tokens(proposal.tokens, parents))
    return process_logits(logits, cfg, presence)


def verify(
    proposal: Proposal,
    logits: torch.Tensor,
    cfg: SamplingConfig,
    context: torch.Tensor,
    generator: torch.Generator | None = None,
    typical: TypicalAcceptance | None = None,
) -> Verdict:
    """Verify ``proposal`` against the target.

    Args:
        proposal: the candidates (``n`` nodes).
        logits: ``[1+n, V]`` raw target logits: row 0 is the pending token's,
            row ``i+1`` node ``i``'s.
        cfg: sampling configuration (applied identically to the proposer's).
        context: ``[L]`` committed tokens, the pending token last.
        generator: seeded generator for the random draws.
        typical: LOSSY typical acceptance for sampling (None = exact; see
            :class:`TypicalAcceptance`); greedy verification ignores it.
    """
    processed = process_rows(logits, proposal, cfg, context)
    if cfg.greedy:
        return _verify_greedy(proposal, processed)
    if typical is not None:
        return _verify_typical(proposal, processed, typical, generator)
    return _verify_sampling(proposal, processed, generator)


def _verify_greedy(proposal: Proposal, processed: torch.Tensor) -> Verdict:
    """processed: ``[1+n, V]``."""
    best = processed.argmax(dim=-1)  # [1+n]
    n = proposal.num_nodes
    if proposal.is_chain:
        if n == 0:
            return Verdict([], int(best[0]), 0)
        match = (proposal.tokens == best[:n]).long()
        a = int(match.cumprod(0).sum())
        return Verdict(list(range(a)), int(best[a]), a)
    best_l = best.tolist()
    toks = proposal.tokens.tolist()
    kids = children(proposal.parents)
    row, accepted = 0, []
    while True:
        nxt = next((c for c in kids[row] if toks[c] == best_l[row]), None)
        if nxt is None:
            return Verdict(accepted, best_l[row], row)
        accepted.append(nxt)
        row = nxt + 1


def _verify_sampling(proposal: Proposal, target_probs: torch.Tensor, generator: torch.Generator | None) -> Verdict:
    """target_probs: ``[1+n, V]`` probabilities."""
    parents = (
        proposal.parents if proposal.parents is not None else chain_parents(proposal.num_nodes, target_probs.device)
    )
    kids = children(parents)
    toks = proposal.tokens.tolist()
    row, accepted = 0, []
    while True:
        residual = target_probs[row].clone()
        moved = False
        for c in kids[row]:
            x = toks[c]
            u = float(torch.rand((), generator=generator, device=target_probs.device))
            if proposal.draft_probs is None:
                total = float(residual.sum())
                p_accept = float(residual[x]) / total if total > 0 else 0.0
                if u < p_accept:
                    moved = True
                else:
                    residual[x] = 0.0
            else:
                q = proposal.draft_probs[c]
                total = float(residual.sum())
                p_accept = min(1.0, float(residual[x]) / total / max(float(q[x]), 1e-30)) if total > 0 else 0.0
                if u < p_accept:
                    moved = True
                else:
                    residual = torch.clamp(residual / max(total, 1e-30) - q, min=0.0)
            if moved:
                accepted.append(c)
                row = c + 1
                break
        if not moved:
            if float(residual.sum()) <= 0.0:  # numerically exhausted: fall back to the row itself
                residual = target_probs[row]
            token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            return Verdict(accepted, token, row)


def _verify_typical(
    proposal: Proposal, target_probs: torch.Tensor, typical: TypicalAcceptance, generator: torch.Generator | None
) -> Verdict:
    """LOSSY typical acceptance (see :class:`TypicalAcceptance`). target_probs: ``[1+n, V]`` probabilities."""
    n = proposal.num_nodes
    parents = proposal.parents if proposal.parents is not None else chain_parents(n, target_probs.device)
    if n:
        parent_rows = parents.to(target_probs.device).long() + 1  # [n] row whose distribution judges each node
        node_probs = target_probs[parent_rows, proposal.tokens.to(target_probs.device)]  # [n]
        passes = (node_probs > typical.thresholds(target_probs)[parent_rows]).tolist()
        logp = torch.log(node_probs.clamp_min(1e-30)).tolist()
    par = parents.tolist() if n else []
    # nodes come parents first, so one pass gives each node's path length (0 = not all of its path passes)
    length = [0] * n
    score = [0.0] * n
    best, best_key = -1, (0, 0.0)
    for i in range(n):
        up = par[i]
        if not passes[i] or (up >= 0 and length[up] == 0):
            continue
        length[i] = 1 + (length[up] if up >= 0 else 0)
        score[i] = logp[i] + (score[up] if up >= 0 else 0.0)
        if (length[i], score[i]) > best_key:
            best, best_key = i, (length[i], score[i])
    accepted: list[int] = []
    node = best
    while node >= 0:
        accepted.append(node)
        node = par[node]
    accepted.reverse()
    row = accepted[-1] + 1 if accepted else 0
    token = int(torch.multinomial(target_probs[row], 1, generator=generator))
    return Verdict(accepted, token, row)
