"""Adaptive draft length: choose K from measured costs and the running acceptance rate.

With a per-token acceptance rate ``alpha``, a chain of ``K`` candidates yields
``(1 - alpha**(K+1)) / (1 - alpha)`` tokens per step (accepted + 1) and costs
``K * draft_seconds + verify_seconds(K + 1)``. The controller picks the ``K``
that maximises tokens per second. Costs are exponential moving averages of
what the engine measures; verify cost per row count starts from the measured
prior of the target's kind of compute (:func:`specdec.costs.prior`) and is replaced by
measurements as they come, the prior's shape extrapolating beyond them.

Seeded sampling must be reproducible, and measured times are not: with
``deterministic`` set, the controller ignores timings and uses the static
cost ratio (from parameter counts) instead, so the same seed gives the same
draft lengths and hence the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import costs


@dataclass
class DraftLengthController:
    """Chooses the number of speculative tokens per step.

    Attributes:
        fixed: a fixed K (``num_speculative_tokens``), or None for adaptive.
        k_max: the largest K considered.
        initial_k: K used before anything is measured.
        decay: weight of the newest observation in the moving averages.
        row_prior: relative cost of a target forward by row count before (and
            beyond) the measured ones; :meth:`start` sets the target's (by
            device, dtype and the CPU's bfloat16 instructions),
            never cheaper for more rows: the measured CPU table's dip below one
            row at 4 rows made it send copies a plain step beat (docs/design.md).
    """

    fixed: int | None = None
    k_max: int = 12
    initial_k: int = 4
    decay: float = 0.25
    alpha_accepted: float = 3.0  # prior: 3 accepted per 1 rejection (alpha = 0.75)
    alpha_rejected: float = 1.0
    draft_seconds: float | None = None
    verify_seconds: dict[int, float] = field(default_factory=dict)
    static_draft_cost: float = 0.4  # draft step / target step, from parameter counts
    deterministic: bool = False
    row_prior: costs.RowCost = field(default_factory=lambda: costs.prior("cpu", monotone=True))

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.deterministic and not self.measured:
            return self.initial_k
        alpha = self.acceptance
        best_k, best_rate = 0, 0.0
        for k in range(0, self.k_max + 1):
            tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
            rate = tokens / self.step_cost(k, k + 1)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def start(self, deterministic: bool, cost_kind: str | None = None) -> None:
        """Begin a generation (on the target's kind of compute, :func:`specdec.costs.cost_kind`: its
        prior row costs, :func:`specdec.costs.prior`). A seeded one starts from the prior acceptance,
        so its draft lengths depend on the seed alone, not on earlier generations."""
        self.deterministic = deterministic
        if cost_kind is not None:
            self.row_prior = costs.prior(cost_kind, monotone=True)
        if deterministic:
            fresh = DraftLengthController()
            self.alpha_accepted, self.alpha_rejected = fresh.alpha_accepted, fresh.alpha_rejected

    def step_cost(self, drafted: int, rows: int) -> float:
        """Cost of a step that drafts ``drafted`` tokens and verifies ``rows`` rows.

        Seconds from the measurements; in ``deterministic`` mode (or before
        anything is measured) units of a one-row target forward from the
        static cost ratio, so decisions never depend on timings there.
        """
        if self.deterministic or not self.measured:
            return drafted * self.static_draft_cost + self.row_prior(rows)
        return drafted * self.draft_seconds + self._verify_cost(rows)

    @property
    def measured(self) -> bool:
        """Whether both the draft cost and a verify cost have been measured."""
        return self.draft_seconds is not None and bool(self.verify_seconds)

    @property
    def acceptance(self) -> float:
        """Estimated probability that one candidate is accepted, in [0, 0.99]."""
        return min(0.99, self.alpha_accepted / (self.alpha_accepted + self.alpha_rejected))

    def record_step(self, proposed: int, accepted: int) -> None:
        """One verified chain: ``accepted`` of ``proposed`` candidates kept."""
        if proposed == 0:
            return
        keep = 1.0 - self.decay
        rejected = 1.0 if accepted < proposed else 0.0
        self.alpha_accepted = keep * self.alpha_accepted + accepted
        self.alpha_rejected = keep * self.alpha_rejected + rejected

    def record_draft(self, seconds_per_token: float) -> None:
        self.draft_seconds = ema(self.draft_seconds, seconds_per_token, self.decay)

    def record_verify(self, rows: int, seconds: float) -> None:
        self.verify_seconds[rows] = ema(self.verify_seconds.get(rows), seconds, self.decay)

    def pays(self, candidates: int, rows: int) -> bool:
        """Whether a step verifying a chain of ``candidates`` in a ``rows``-row forward beats a plain step.

        Expected tokens per second of that step (from the acceptance estimate)
        against one token per one-row forward, both from measured costs. True
        while the costs are not measured yet, and always in ``deterministic``
        mode, where timings must not steer the tokens.
        """
        if self.deterministic or not self.verify_seconds or candidates < 1:
            return True
        alpha = self.acceptance
        tokens = (1 - alpha ** (candidates + 1)) / (1 - alpha)
        return tokens / self._verify_cost(rows) > 1.0 / self._verify_cost(1)

    def _verify_cost(self, rows: int) -> float:
        measured = self.verify_seconds
        if rows in measured:
            return measured[rows]
        below = [r for r in measured if r < rows]
        above = [r for r in measured if r > rows]
        if below and above:  # between two measurements: linear
            lo, hi = max(below), min(above)
            return measured[lo] + (measured[hi] - measured[lo]) * (rows - lo) / (hi - lo)
        # outside them: scale the nearest measurement by the prior shape
        near = min(measured, key=lambda r: abs(r - rows))
        return measured[near] * self.row_prior(rows) / self.row_prior(near)


def ema(old: float | None, new: float, decay: float) -> float:
    return new if old is None else (1 - decay) * old + decay * new
