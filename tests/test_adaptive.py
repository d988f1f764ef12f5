"""The cost rule that lets ``auto`` (prompt lookup) decode plainly when copies do not pay."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tiny_model

from specdec.adaptive import DraftLengthController
from specdec.proposers.base import DecodeState
from specdec.proposers.options import PromptLookupOptions
from specdec.proposers.prompt_lookup import PromptLookupProposer
from specdec.sampling import SamplingConfig


def _measured(acceptance: tuple[float, float], costs: dict[int, float]) -> DraftLengthController:
    """A controller with the given (accepted, rejected) counts and measured seconds per row count."""
    c = DraftLengthController(draft_seconds=0.0, static_draft_cost=0.0)
    c.alpha_accepted, c.alpha_rejected = acceptance
    for rows, seconds in costs.items():
        c.record_verify(rows, seconds)
    return c


def test_measured_costs_interpolate_between_row_counts() -> None:
    c = _measured((3.0, 1.0), {1: 0.10, 9: 0.30})
    assert abs(c._verify_cost(5) - 0.20) < 1e-9
    assert c._verify_cost(9) == 0.30
    assert c._verify_cost(17) > 0.30  # beyond the widest measurement: scaled by the prior shape


def test_a_chain_pays_only_when_its_expected_tokens_beat_its_measured_cost() -> None:
    steep = {1: 0.10, 7: 0.25}  # seven rows cost 2.5x one, as on a small float32 model on a busy CPU
    assert not _measured((0.3, 2.7), steep).pays(6, 7)  # 10% acceptance: 1.1 tokens for 2.5x the time
    assert _measured((9.0, 1.0), steep).pays(6, 7)  # 90% acceptance: ~5.2 tokens for 2.5x
    assert _measured((0.3, 2.7), {1: 0.10, 7: 0.105}).pays(6, 7)  # rows nearly free: even a little pays


def test_before_measuring_and_when_seeded_the_rule_never_refuses() -> None:
    assert _measured((0.1, 5.0), {}).pays(6, 7)
    seeded = _measured((0.1, 5.0), {1: 0.1, 7: 1.0})
    seeded.start(deterministic=True)
    assert seeded.pays(6, 7), "seeded sampling must not depend on timings"


def _state(tokens: list[int]) -> DecodeState:
    return DecodeState(
        tokens=torch.tensor(tokens), prompt_length=len(tokens), sampling=SamplingConfig(), generator=None
    )


def test_prompt_lookup_sends_a_plain_step_when_its_copy_does_not_pay() -> None:
    tokens = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7]  # the suffix 5 6 7 occurred before: a copy of 8 9 10 ... is found
    proposer = PromptLookupProposer(PromptLookupOptions(branches=1), fixed=None)
    proposer.reset(_state(tokens))
    assert proposer.propose(_state(tokens), 8).num_nodes > 0, "nothing measured yet: the copy is sent"
    proposer.controller = _measured((0.3, 2.7), {1: 0.10, 4: 0.20, 8: 0.30})
    draft = proposer.propose(_state(tokens), 8)
    assert draft.num_nodes == 0 and proposer._shadow == 8, "plain step; the copy's first token is still scored"
    proposer.controller = _measured((9.0, 1.0), {1: 0.10, 4: 0.20, 8: 0.30})
    assert proposer.propose(_state(tokens), 8).tokens.tolist()[:3] == [8, 9, 10]


def test_draft_lengths_and_medusa_trees_start_from_one_measured_cost_per_kind_of_compute() -> None:
    from specdec.costs import CPU_EMULATED_ROW_COST, CPU_ROW_COST, GPU_ROW_COST, RowCostModel, prior

    c = DraftLengthController(static_draft_cost=0.0)
    c.start(deterministic=True, cost_kind="cpu")
    medusa = RowCostModel(prior=prior("cpu"))
    assert c.step_cost(0, 64) == medusa(64) == CPU_ROW_COST[64]  # seeded: the measured table, no timings
    assert medusa(4) == CPU_ROW_COST[4] < 1.0 and c.step_cost(0, 4) == 1.0  # the controller's never dips below one row
    c.start(deterministic=True, cost_kind="cuda")
    assert c.step_cost(0, 64) == RowCostModel(prior=prior("cuda"))(64) == GPU_ROW_COST[64]
    assert c.step_cost(0, 16) < CPU_ROW_COST[16]  # on a GPU rows are nearly free
    c.start(deterministic=True, cost_kind="cpu-emulated")  # bfloat16 without its instructions: rows cost forwards
    assert c.step_cost(0, 16) == CPU_EMULATED_ROW_COST[16] > 7 * CPU_ROW_COST[16]


@pytest.mark.parametrize(
    ("device", "dtype", "native", "kind"),
    [
        ("cuda", torch.bfloat16, False, "cuda"),
        ("cpu", torch.float32, False, "cpu-fp32"),
        ("cpu", torch.bfloat16, True, "cpu"),
        ("cpu", torch.bfloat16, False, "cpu-emulated"),
        ("cpu", torch.float16, False, "cpu-emulated"),
        ("mps", torch.float16, False, "cpu"),  # not measured: the CPU's
    ],
)
def test_the_prior_follows_device_dtype_and_the_cpus_bfloat16_instructions(monkeypatch, device, dtype, native, kind):
    from specdec import costs

    monkeypatch.setattr(costs, "cpu_computes_natively", lambda d: native)
    assert costs.cost_kind(device, dtype) == kind
    assert costs.prior_table(kind) is costs.PRIORS[kind]


def test_the_engine_tells_proposers_the_targets_kind_of_compute(monkeypatch) -> None:
    """A float32 target on a CPU starts the draft-length controller from the float32 table; bfloat16
    on a CPU without bfloat16 instructions from the emulated one."""
    from specdec import SpeculativeGenerator, costs

    model = tiny_model()
    gen = SpeculativeGenerator(model, method="prompt_lookup")
    gen.generate([1, 2, 3, 1, 2], max_new_tokens=3)
    kind = "cuda" if DEVICE.type == "cuda" else "cpu-fp32"
    assert gen.cost_kind == kind
    assert gen.proposer.controller.row_prior(16) == costs.prior(kind, monotone=True)(16) != costs.prior("cpu")(16)
    if DEVICE.type == "cpu":
        monkeypatch.setattr(costs, "cpu_computes_natively", lambda dtype: False)
        assert SpeculativeGenerator(model.to(torch.bfloat16), method="prompt_lookup").cost_kind == "cpu-emulated"
