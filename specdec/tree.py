"""Tree helpers shared by the engine, the verifier and tree proposers.

A draft tree has the pending token as its root (row 0) and ``n`` nodes
(rows ``1..n``) given by ``parents`` (``-1`` = child of the root).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chain_parents(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n]`` parents of a chain: ``[-1, 0, 1, ..., n-2]``."""
    return torch.arange(-1, n - 1, device=device)


def depths(parents: torch.Tensor) -> torch.Tensor:
    """``[n]`` depth of each node (children of the root have depth 1)."""
    out: list[int] = []
    for p in parents.tolist():
        out.append(1 if p < 0 else out[p] + 1)
    return torch.tensor(out, dtype=torch.long, device=parents.device)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """``[1+n, 1+n]`` bool: row ``r`` may attend to column ``c`` (root, ancestors, itself).

    Row/column 0 is the root; node ``i`` is row ``i+1``.
    """
    n = parents.numel()
    mask = torch.zeros(1 + n, 1 + n, dtype=torch.bool, device=parents.device)
    mask[:, 0] = True
    mask[0, 0] = True
    for i, p in enumerate(parents.tolist()):
        row = i + 1
        if p >= 0:
            mask[row] = mask[p + 1]
        mask[row, row] = True
    return mask


def path_tokens(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """``[1+n, d]`` for each row, the node tokens on its path from the root, inclusive
    (root row empty), padded with ``-1``. Used for per-row repetition penalty."""
    n = tokens.numel()
    paths: list[list[int]] = [[]]
    toks = tokens.tolist()
    for i, p in enumerate(parents.tolist()):
        paths.append((paths[p + 1] if p >= 0 else []) + [toks[i]])
    width = max((len(p) for p in paths), default=0)
    out = torch.full((1 + n, max(width, 1)), -1, dtype=torch.long, device=tokens.device)
    for r, p in enumerate(paths):
        if p:
            out[r, : len(p)] = torch.tensor(p, dtype=torch.long)
    return out


def children(parents: torch.Tensor) -> list[list[int]]:
    """For each row (0 = root, ``i+1`` = node ``i``), the node indices of its children, in order."""
    out: list[list[int]] = [[] for _ in range(parents.numel() + 1)]
    for i, p in enumerate(parents.tolist()):
        out[p + 1].append(i)
    return out


def leaf_paths(tokens: Sequence[int], parents: Sequence[int]) -> list[list[int]]:
    """The token sequence of every root-to-leaf path of a tree (root excluded), leaves in node order."""
    paths: list[list[int]] = []
    has_child = set(parents)
    for i, p in enumerate(parents):
        paths.append((paths[p] if p >= 0 else []) + [tokens[i]])
    return [paths[i] for i in range(len(tokens)) if i not in has_child]


def build_trie(candidates: Sequence[Sequence[int]], max_depth: int) -> tuple[list[int], list[int]]:
    """Merge candidate sequences into a trie below the root.

    Args:
        candidates: token sequences continuing the root, in order of preference.
        max_depth: each sequence is cut to this many tokens.
    Returns:
        ``(tokens, parents)``, each of length ``n``: nodes in creation order (a
        parent before its children, siblings in order of preference), parent
        ``-1`` for a child of the root.
    """
    tokens: list[int] = []
    parents: list[int] = []
    child_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for seq in candidates:
        parent = -1
        for t in list(seq)[:max_depth]:
            node = child_of.get((parent, t))
            if node is None:
                node = len(tokens)
                tokens.append(t)
                parents.append(parent)
                child_of[(parent, t)] = node
            parent = node
    return tokens, parents
