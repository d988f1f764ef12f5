"""Medusa trees: ``medusa_choices``-style paths -> the buffers of one tree forward.

A tree is a list of paths. Path ``[i0, i1, ..., id]`` is the node at depth
``d + 1`` whose token is head ``d``'s rank-``id`` candidate, below the node
``[i0, ..., i(d-1)]``; ``[0]`` is head 0's best guess right after the pending
token, ``[0, 1]`` head 1's second-best guess after it. Every prefix of a path
must itself be in the tree.

Nodes are ordered by depth, then lexicographically, so a parent precedes its
children and siblings come in order of preference, which is what
:class:`~specdec.proposers.base.Proposal` asks for. Row 0 of every buffer is the
root (the pending token); node ``i`` is row ``i + 1``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..costs import row_cost
from ..errors import SpecdecError
from ..tree import ancestor_mask, depths

Choices = Sequence[Sequence[int]]


@dataclass(frozen=True)
class TreeBuffers:
    """Everything a tree forward needs, derived once from the paths.

    Attributes:
        choices: the sorted paths, one per node.
        parents: ``[n]`` long, parent node index (``-1`` = child of the root).
        head_index: ``[n]`` long, which head proposes each node (its depth - 1).
        rank: ``[n]`` long, which of that head's candidates (0 = best).
        depths: ``[n]`` long, depth of each node (children of the root: 1).
        attn_mask: ``[1+n, 1+n]`` bool, row may attend column (root, ancestors, itself).
        position_offsets: ``[1+n]`` long, position of each row after the root's (root 0).
        retrieve_indices: ``[leaves, 1+max_depth]`` long, for each root-to-leaf path the
            rows on it (root first), padded with ``-1``.
        topk: how many candidates each head must provide (max rank + 1).
    """

    choices: tuple[tuple[int, ...], ...]
    parents: torch.Tensor
    head_index: torch.Tensor
    rank: torch.Tensor
    depths: torch.Tensor
    attn_mask: torch.Tensor
    position_offsets: torch.Tensor
    retrieve_indices: torch.Tensor
    topk: int

    @property
    def num_nodes(self) -> int:
        return len(self.choices)

    @property
    def max_depth(self) -> int:
        return max((len(c) for c in self.choices), default=0)


def normalize_choices(choices: Choices) -> tuple[tuple[int, ...], ...]:
    """Validate paths and sort them by depth, then lexicographically.

    Raises :class:`SpecdecError` on an empty path, a negative rank, a duplicate
    or a path whose prefix is missing.
    """
    paths: list[tuple[int, ...]] = []
    for c in choices:
        try:
            path = tuple(int(i) for i in c)
        except (TypeError, ValueError):
            raise SpecdecError(f"a Medusa tree path must be a list of integers, got {c!r}") from None
        if not path or any(i < 0 for i in path) or any(int(i) != i for i in c):
            raise SpecdecError(
                f"invalid Medusa tree path {list(c)!r}", "paths are non-empty lists of ranks >= 0, e.g. [0, 1]"
            )
        paths.append(path)
    if len(set(paths)) != len(paths):
        raise SpecdecError("the Medusa tree lists a path twice")
    present = set(paths)
    for p in paths:
        if len(p) > 1 and p[:-1] not in present:
            raise SpecdecError(
                f"Medusa tree path {list(p)} has no parent {list(p[:-1])}",
                "every prefix of a path must also be in the tree",
            )
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def build_tree(choices: Choices) -> TreeBuffers:
    """The :class:`TreeBuffers` of ``choices`` (see the module docstring)."""
    paths = normalize_choices(choices)
    index = {p: i for i, p in enumerate(paths)}
    parents = torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in paths], dtype=torch.long)
    head_index = torch.tensor([len(p) - 1 for p in paths], dtype=torch.long)
    rank = torch.tensor([p[-1] for p in paths], dtype=torch.long)
    node_depths = depths(parents) if paths else torch.zeros(0, dtype=torch.long)
    has_child = {p[:-1] for p in paths if len(p) > 1}
    leaves = [p for p in paths if p not in has_child]
    width = 1 + max((len(p) for p in paths), default=0)
    retrieve = torch.full((len(leaves), width), -1, dtype=torch.long)
    for r, leaf in enumerate(leaves):
        rows = [0] + [index[leaf[:d]] + 1 for d in range(1, len(leaf) + 1)]
        retrieve[r, : len(rows)] = torch.tensor(rows)
    return TreeBuffers(
        choices=paths,
        parents=parents,
        head_index=head_index,
        rank=rank,
        depths=node_depths,
        attn_mask=ancestor_mask(parents),
        position_offsets=torch.cat([torch.zeros(1, dtype=torch.long), node_depths]),
        retrieve_indices=retrieve,
        topk=1 + max((p[-1] for p in paths), default=-1),
    )


def truncate_choices(choices: Choices, max_nodes: int) -> tuple[tuple[int, ...], ...]:
    """The first ``max_nodes`` paths in tree order (still a valid tree)."""
    return normalize_choices(choices)[: max(0, max_nodes)]


def cap_tree(
    choices: Choices, max_nodes: int, accuracy: Sequence[Sequence[float]] | None = None
) -> tuple[tuple[int, ...], ...]:
    """At most ``max_nodes`` paths of ``choices``, still a valid tree.

    With per-rank head accuracies (``[num_heads][k]``, not cumulative), the
    nodes whose whole path is most likely to be accepted are kept (the product
    of the accuracies along it); without them, the first nodes in tree order.
    """
    paths = normalize_choices(choices)
    if len(paths) <= max_nodes:
        return paths
    if not accuracy:
        return truncate_choices(paths, max_nodes)

    def acc(depth: int, r: int) -> float:
        row = accuracy[depth] if depth < len(accuracy) else ()
        return float(row[r]) if r < len(row) else 0.0

    value: dict[tuple[int, ...], float] = {}
    for path in paths:  # parents first
        value[path] = (value[path[:-1]] if len(path) > 1 else 1.0) * acc(len(path) - 1, path[-1])
    kept: set[tuple[int, ...]] = set()
    for path in sorted(paths, key=lambda p: (-value[p], len(p), p)):
        if len(kept) >= max_nodes:
            break
        if len(path) == 1 or path[:-1] in kept:
            kept.add(path)
    return normalize_choices(kept)


def tree_from_accuracies(
    accuracy: Sequence[Sequence[float]],
    max_nodes: int = 64,
    cost: Callable[[int], float] | None = None,
) -> tuple[list[list[int]], float]:
    """The tree that maximises expected tokens per unit of forward cost.

    Nodes are added best-first by the probability of their whole path being
    accepted (the product of the per-rank accuracies along it, assuming heads
    err independently); a node's next sibling is only considered after it, so
    siblings stay in order of preference. The tree size is then chosen to
    maximise ``(1 + expected accepted) / cost(1 + n)``.

    Args:
        accuracy: ``[num_heads][k]`` probability that head ``h``'s rank-``r``
            candidate is the target's token (not cumulative).
        max_nodes: largest tree considered.
        cost: relative cost of a forward over ``r`` rows (default :func:`specdec.costs.row_cost`,
            the reference CPU's).

    Returns:
        ``(paths, expected tokens per step)``; ``expected`` counts the +1 token.
    """
    cost = cost or row_cost
    num_heads = len(accuracy)
    if num_heads == 0 or max_nodes <= 0:
        return [], 1.0

    def acc(depth: int, r: int) -> float:
        row = accuracy[depth]
        return float(row[r]) if r < len(row) else 0.0

    heap: list[tuple[float, tuple[int, ...]]] = [(-acc(0, 0), (0,))]
    chosen: list[tuple[int, ...]] = []
    gains: list[float] = []
    while heap and len(chosen) < max_nodes:
        neg, path = heapq.heappop(heap)
        value = -neg
        if value <= 0.0:
            break
        chosen.append(path)
        gains.append(value)
        parent_value = value / acc(len(path) - 1, path[-1]) if acc(len(path) - 1, path[-1]) > 0 else 0.0
        sibling = path[:-1] + (path[-1] + 1,)
        heapq.heappush(heap, (-parent_value * acc(len(path) - 1, sibling[-1]), sibling))
        if len(path) < num_heads:
            heapq.heappush(heap, (-value * acc(len(path), 0), path + (0,)))
    best_n = best_size(gains, cost)
    return [list(p) for p in normalize_choices(chosen[:best_n])], 1.0 + sum(gains[:best_n])


def best_size(gains: Sequence[float], cost: Callable[[int], float]) -> int:
    """How many of ``gains`` to verify: the ``n`` maximising ``(1 + sum(gains[:n])) / cost(1 + n)``.

    ``gains`` are the nodes' probabilities of being accepted (their whole path),
    best first; ``cost(r)`` is the relative cost of a forward over ``r`` rows.
    """
    best_n, best_rate, total = 0, 1.0 / cost(1), 0.0
    for n, g in enumerate(gains, start=1):
        total += g
        rate = (1.0 + total) / cost(1 + n)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


# A default for CPUs, sized for "16 rows cost 1.3x one": 15 nodes, most of them
# on the first two heads, whose guesses are right most often.
CPU_DEFAULT_TREE: tuple[tuple[int, ...], ...] = (
    (0,),
    (1,),
    (2,),
    (3,),
    (0, 0),
    (0, 1),
    (0, 2),
    (1, 0),
    (1, 1),
    (2, 0),
    (0, 0, 0),
    (0, 0, 1),
    (0, 1, 0),
    (1, 0, 0),
    (0, 0, 0, 0),
)


def default_tree(num_heads: int) -> list[list[int]]:
    """:data:`CPU_DEFAULT_TREE` restricted to ``num_heads`` heads."""
    return [list(p) for p in CPU_DEFAULT_TREE if len(p) <= num_heads]
