"""Medusa heads: extra heads on the target's final hidden state propose a tree of candidates.

- :class:`MedusaHeads` (``specdec.MedusaHeads``): create, save, load (also the
  Medusa project's published layout).
- :mod:`specdec.medusa.choices`: ``medusa_choices``-style paths -> tree buffers,
  default CPU trees, trees from measured per-head accuracy.
- :mod:`specdec.medusa.train`: CPU-friendly self-distillation
  (``specdec-local train-medusa``).

Decoding with heads is method ``"medusa"`` of :class:`specdec.SpeculativeGenerator`
(:mod:`specdec.proposers.medusa`).
"""

from __future__ import annotations

from .heads import MedusaConfig, MedusaHeads
from .choices import TreeBuffers, build_tree, default_tree, tree_from_accuracies

__all__ = ["MedusaHeads", "MedusaConfig", "TreeBuffers", "build_tree", "default_tree", "tree_from_accuracies"]
