"""Method ``medusa``: Medusa heads propose a tree of candidates from the target's last hidden state.

Each step costs one target forward:

1. *generate candidates* (:meth:`MedusaProposer.propose`): the heads' top-k
   tokens, read from the hidden state of the previous step, form this step's
   tree: by default chosen from the heads' own probabilities
   (:meth:`~specdec.medusa.heads.MedusaHeads.dynamic_tree`, the likeliest
   paths, as many nodes as repay their forward cost), else the fixed tree of
   :mod:`specdec.medusa.choices` (node ``[i0, i1]`` = head 0's rank-``i0``
   token, then head 1's rank-``i1`` token). Sequential heads
   (:class:`~specdec.medusa.heads.MedusaHeads`, ``sequential``) also read
   the tree's root token and each node's token before guessing its children.
2. *tree decoding* and *evaluate posterior*: the engine runs the tree in one
   target forward (tree mask, depth positions) and verifies it with the one
   lossless verifier (greedy: longest matching path; sampling: recursive
   rejection over siblings with point-mass candidates). Opt-in and LOSSY
   when sampling: Medusa's typical acceptance (``typical_acceptance=True``,
   :class:`~specdec.verify.TypicalAcceptance`), which the engine hands to the
   same verifier.
3. *update inputs* (:meth:`MedusaProposer.observe`): the engine returns the
   target's final hidden states; the heads read the row that produced the last
   new token, which gives the next step's candidates without another forward.

*Context copies* (``copy_tokens``, 0 = heads only): when the text repeats its
context (edits, summaries) the heads, which see one hidden state, guess only a
few tokens ahead, while the tokens after an earlier occurrence of the current
suffix may continue for dozens. Those copies
(:class:`~specdec.ngrams.ContextCopies`, as lookahead uses
them) are merged with the tree's paths into one trie, still one forward and
the same verifier; while copies are being kept the tree's rows are left out.

The first step has no hidden state yet: it offers copies only, and asks for one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..costs import RowCostModel
from ..errors import MissingHeadsError, SpecdecError
from ..medusa.heads import MedusaHeads
from ..medusa.choices import TreeBuffers, best_size, build_tree, cap_tree, default_tree
from ..ngrams import ContextCopies
from ..tree import build_trie, leaf_paths
from ..verify import TypicalAcceptance
from .base import DecodeState, Proposal, StepOutcome
from .options import MedusaOptions


# most nodes of a per-step (dynamic) tree unless tree_size says otherwise: on the reference
# CPU a forward over 17 rows costs 1.3-1.5x one, more than the likeliest extra nodes repay
DYNAMIC_TREE_NODES = 16


class MedusaProposer:
    """Candidates from Medusa heads as a fixed or a per-step tree (see the module docstring).

    Args:
        heads: the trained heads.
        tree: the fixed tree's paths (``medusa_choices`` style).
        typical_acceptance: LOSSY acceptance when sampling, or None (exact).
        copy_tokens: longest context copy (0 = none).
        dynamic_nodes: None = the fixed ``tree``; else each step's tree is chosen from the
            heads' confidence, with at most this many nodes.
        row_cost: the relative cost of a target forward over ``r`` rows, learnt from every
            step's measured forward, to size each dynamic tree (None = always ``dynamic_nodes`` nodes).
    """

    name = "medusa"

    def __init__(
        self,
        heads: MedusaHeads,
        tree: Sequence[Sequence[int]],
        typical_acceptance: TypicalAcceptance | None = None,
        copy_tokens: int = 0,
        dynamic_nodes: int | None = None,
        row_cost: RowCostModel | None = None,
    ) -> None:
        self.heads = heads.eval()
        self.tree: TreeBuffers = build_tree(tree)
        self.dynamic_nodes = dynamic_nodes
        self.row_cost = row_cost
        self.copies = ContextCopies(copy_tokens) if copy_tokens else None
        self.typical_acceptance = typical_acceptance  # read by the engine, handed to the verifier
        if self.tree.num_nodes == 0:
            raise SpecdecError("the Medusa tree is empty", "give at least one path, e.g. [[0]]")
        if self.tree.max_depth > heads.num_heads:
            raise SpecdecError(
                f"the Medusa tree is {self.tree.max_depth} deep but the heads number {heads.num_heads}",
                "use paths no longer than the number of heads",
            )
        # the next step's tree: (tokens, parents, path probabilities of a dynamic tree, else None)
        self._guesses: tuple[list[int], list[int], list[float] | None] | None = None

    def reset(self, state: DecodeState) -> None:
        self._guesses = None
        if self.row_cost is not None:  # seeded sampling must not depend on timings
            self.row_cost.start(deterministic=state.timing_free)
        if self.copies is not None:
            self.copies.reset(state.tokens.tolist())

    def propose(self, state: DecodeState, max_nodes: int) -> Proposal:
        """The tree (at most ``max_nodes`` deep) merged with the context copies, if any."""
        device = state.tokens.device
        copies = self.copies.propose(max_nodes) if self.copies is not None and max_nodes > 0 else []
        guesses = self._guesses if max_nodes > 0 and not (copies and self.copies.hot) else None
        tree = self._sized(*guesses, copies, max_nodes) if guesses is not None else ([], [])
        if not copies:
            n = min(max_nodes, len(tree[0]))  # every prefix is a tree, so n nodes are at most n deep
            tokens, parents = tree[0][:n], tree[1][:n]
        else:
            tokens, parents = build_trie([*copies, *leaf_paths(*tree)], max_nodes)
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            parents=torch.tensor(parents, dtype=torch.long, device=device),
            need_hidden=True,
        )

    def _sized(
        self, tokens: list[int], parents: list[int], probs: list[float] | None, copies: list[list[int]], max_nodes: int
    ) -> tuple[list[int], list[int]]:
        """A dynamic tree cut to the size worth its forward cost beside the rows of ``copies``
        (a fixed tree, or a dynamic one without a cost model, is returned whole)."""
        if probs is None or self.row_cost is None:
            return tokens, parents
        copy_rows = len(build_trie(copies, max_nodes)[0]) if copies else 0
        n = best_size(probs, lambda rows: self.row_cost(rows + copy_rows))
        return tokens[:n], parents[:n]  # best first: any prefix is a tree

    def observe(self, outcome: StepOutcome) -> None:
        """Read the heads at the hidden state of the row that produced the last new token (the next root)."""
        if self.copies is not None:
            self.copies.observe(outcome.tokens, outcome.new_tokens.tolist())
        if self.row_cost is not None:
            self.row_cost.record(1 + outcome.proposal.num_nodes, outcome.verify_seconds)
        if outcome.hidden is None:
            self._guesses = None
            return
        hidden = outcome.hidden[outcome.last_row]  # [H]
        root = int(outcome.new_tokens[-1])
        if self.dynamic_nodes is not None:
            self._guesses = self.heads.dynamic_tree(hidden, root, self.dynamic_nodes)
        else:
            self._guesses = (self.heads.tree_tokens(hidden, root, self.tree).tolist(), self.tree.parents.tolist(), None)


def _resolve_heads(value: object, target: torch.nn.Module) -> MedusaHeads:
    if value is None:
        raise MissingHeadsError(
            "method 'medusa' needs Medusa heads",
            "pass medusa_heads= (a MedusaHeads or a folder; --medusa-heads DIR in the CLI); "
            "train some with `specdec-local train-medusa`",
        )
    if isinstance(value, MedusaHeads):
        value.attach(target)  # refuses heads made for another target
        return value
    if isinstance(value, (str, os.PathLike)):
        return MedusaHeads.from_pretrained(value, target)
    raise SpecdecError(f"medusa_heads must be a MedusaHeads or a folder, got {type(value).__name__}")


def _resolve_tree(value: object, heads: MedusaHeads) -> tuple[tuple[int, ...], ...]:
    if value is None or value == "auto":
        tree = heads.config.tree or default_tree(heads.num_heads)
    elif value == "default":
        tree = default_tree(heads.num_heads)
    elif isinstance(value, (list, tuple)):
        tree = value
    else:
        raise SpecdecError(
            f"tree must be a list of paths such as [[0], [0, 0], [1]], got {value!r}",
            "or leave it unset for the tree stored with the heads",
        )
    return tuple(tuple(int(i) for i in p) for p in tree)


def _resolve_typical(options: MedusaOptions) -> TypicalAcceptance | None:
    value = options.typical_acceptance
    knobs = {
        k: float(getattr(options, k))
        for k in ("posterior_threshold", "posterior_alpha")
        if getattr(options, k) is not None
    }
    if isinstance(value, TypicalAcceptance):
        if knobs:
            raise SpecdecError("give posterior_threshold/posterior_alpha either in the TypicalAcceptance or alone")
        return value
    if value is None or value is False:
        if knobs:
            raise SpecdecError(
                f"{', '.join(knobs)} only apply with typical acceptance",
                "pass typical_acceptance=True (--typical-acceptance), which is lossy",
            )
        return None
    if value is True:
        return TypicalAcceptance(**knobs)
    raise SpecdecError(f"typical_acceptance must be True, False or a TypicalAcceptance, got {value!r}")


def build(ctx) -> MedusaProposer:
    options: MedusaOptions = ctx.options
    heads = _resolve_heads(options.medusa_heads, ctx.target)
    typical_acceptance = _resolve_typical(options)
    tree = _resolve_tree(options.tree, heads)
    if options.tree_size is not None:
        tree = cap_tree(tree, options.tree_size, heads.config.head_accuracy)
    dynamic_nodes = row_costs = None
    if options.per_step_tree:
        dynamic_nodes = options.tree_size or DYNAMIC_TREE_NODES
        if options.size_by_cost:
            row_costs = RowCostModel.for_model(ctx.target)
    return MedusaProposer(heads, tree, typical_acceptance, options.copy_tokens, dynamic_nodes, row_costs)
