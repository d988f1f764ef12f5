"""Medusa heads: small residual blocks on the target's final hidden state.

Head ``k`` (0-based) reads the final, post-norm hidden state ``h_t`` of the
target at position ``t`` and predicts the token at ``t + 2 + k`` (the target's
own lm_head predicts ``t + 1``)::

    z = h_t
    for block in blocks:            # num_layers residual SiLU blocks
        z = z + silu(W z + b)       # W zero-initialised: a fresh head is the identity
    logits_k = lm_head(z)           # shared with the target (default) or the head's own

Because ``W`` starts at zero, an untrained head predicts what the target's
lm_head predicts from ``h_t``, which is a sensible start for training.

*Sequential* heads (``sequential=True``, after Hydra, arXiv 2402.05109) also
read the token before their guess: head ``k`` continues the state of head
``k - 1`` with the embedding of the token that state's guess led to, so a
deeper guess knows the path it extends::

    z_{-1} = h_t
    z_k    = z_{k-1} + silu(W_k [z_{k-1}; e(x_{t+1+k})] + b_k)   # then num_layers - 1 plain blocks
    logits_k = lm_head(z_k)

``x_{t+1}`` is the token the target itself gives at ``t`` (the tree's root),
``x_{t+2}`` the depth-1 node on the path, and so on; ``e`` is the target's
input embedding, RMS-normalised. A tree is then read level by level: each
node with children runs one head on its own path (:meth:`MedusaHeads.tree_tokens`).

Output vocabulary: heads may be restricted to a *token subset* (the most
frequent tokens of the training corpus). That only limits which candidates a
head can offer; verification by the target stays exact.

On disk (:meth:`MedusaHeads.save`): ``medusa_heads.safetensors`` plus
``medusa_config.json`` (:class:`MedusaConfig`, with the base model and a
fingerprint of its vocabulary/output layer). :meth:`MedusaHeads.from_pretrained`
also reads the layout the Medusa project publishes (``config.json`` with
``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path`` and
``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SpecdecError
from ..files import atomic_path, write_atomic
from .choices import TreeBuffers

CONFIG_NAME = "medusa_config.json"
WEIGHTS_NAME = "medusa_heads.safetensors"
PUBLISHED_CONFIG = "config.json"
PUBLISHED_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
FORMAT_VERSION = 1
# rows of the output layer sampled for the target fingerprint
_FINGERPRINT_ROWS = 32
_FINGERPRINT_COLS = 16
_FINGERPRINT_RTOL = 0.05

DEFAULT_NUM_HEADS = 4
DEFAULT_NUM_LAYERS = 1


@dataclass
class MedusaConfig:
    """Shape and provenance of a set of heads (saved as ``medusa_config.json``).

    Attributes:
        hidden_size: ``H`` of the target's final hidden state.
        vocab_size: ``V`` of the target's output layer.
        num_heads: heads; head ``k`` predicts the token ``k + 2`` after its hidden state.
        num_layers: residual blocks per head.
        own_lm_head: each head has its own ``[V', H]`` projection instead of sharing
            the target's lm_head.
        subset_size: size of the output token subset (0 = the whole vocabulary).
        base_model_name_or_path: what the heads were trained for (informative).
        model_type: the target's ``config.model_type``.
        fingerprint: a few values of the target's output layer, to refuse other targets.
        sequential: each head also reads the embedding of the token before its guess
            and the previous head's state (see the module docstring).
        tree: a recommended tree (``medusa_choices`` style), e.g. from measured accuracies.
        head_accuracy: measured accuracy ``[num_heads][k]`` of each head's rank-``r`` candidate (per rank, not cumulative).
        format_version: on-disk format.
    """

    hidden_size: int
    vocab_size: int
    num_heads: int = DEFAULT_NUM_HEADS
    num_layers: int = DEFAULT_NUM_LAYERS
    own_lm_head: bool = False
    subset_size: int = 0
    base_model_name_or_path: str = ""
    model_type: str = ""
    fingerprint: list[float] = field(default_factory=list)
    sequential: bool = False
    tree: list[list[int]] | None = None
    head_accuracy: list[list[float]] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpecdecError(f"Medusa config: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.subset_size, int) or not 0 <= self.subset_size <= self.vocab_size:
            raise SpecdecError(f"Medusa config: subset_size must be in [0, vocab_size], got {self.subset_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MedusaConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class ResBlock(nn.Module):
    """``x + silu(linear([x; extra]))``, the linear layer zero-initialised.

    Shapes: ``[..., H]`` (and ``extra [..., extra_size]``) -> ``[..., H]``.
    """

    def __init__(self, hidden_size: int, extra_size: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size + extra_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.act(self.linear(x if extra is None else torch.cat([x, extra], dim=-1)))


def output_layer(target: nn.Module) -> nn.Module:
    """The target's lm_head (its output embeddings)."""
    head = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise SpecdecError(
            f"{type(target).__name__} exposes no output layer with a weight",
            "Medusa heads need a causal LM with an lm_head (get_output_embeddings())",
        )
    return head


def output_weight(target: nn.Module) -> torch.Tensor:
    """``[V, H]`` the target's lm_head weight as a plain dense tensor."""
    weight = output_layer(target).weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise SpecdecError(
            "the target's lm_head weight is not a dense [vocab, hidden] matrix",
            "Medusa heads with a shared lm_head need a dense output layer; try own_lm_head=True",
        )
    return weight.detach()


def input_weight(target: nn.Module) -> torch.Tensor:
    """``[V, H]`` the target's input embedding as a plain dense tensor (read by sequential heads)."""
    embed = target.get_input_embeddings() if hasattr(target, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise SpecdecError(
            f"{type(target).__name__} exposes no dense input embedding",
            "sequential Medusa heads read the target's token embeddings; train plain heads instead",
        )
    return weight.detach()


def target_fingerprint(target: nn.Module) -> list[float]:
    """A few fixed values of the target's output layer (float, rounded), identifying it."""
    weight = output_weight(target)
    v, h = weight.shape
    rows = torch.linspace(0, v - 1, _FINGERPRINT_ROWS).long()
    cols = torch.linspace(0, h - 1, _FINGERPRINT_COLS).long()
    sample = weight.index_select(0, rows.to(weight.device)).index_select(1, cols.to(weight.device)).float().cpu()
    return [round(float(x), 5) for x in sample.flatten()]


def _target_dims(target: nn.Module) -> tuple[int, int]:
    weight = output_weight(target)
    return int(weight.shape[1]), int(weight.shape[0])


def _target_name(target: nn.Module) -> str:
    return str(getattr(target.config, "_name_or_path", "") or getattr(target, "name_or_path", "") or "")


def check_sizes(config: MedusaConfig, target: nn.Module) -> None:
    """Raise :class:`SpecdecError` unless ``config``'s hidden and vocabulary sizes are ``target``'s.

    Checked before any head is allocated: a config of another model could ask
    for ``num_heads x [V, H]`` projections far larger than this target's.
    """
    hidden, vocab = _target_dims(target)
    if (hidden, vocab) != (config.hidden_size, config.vocab_size):
        name = config.base_model_name_or_path or "another model"
        raise SpecdecError(
            f"these Medusa heads were trained for {name} (hidden size {config.hidden_size}, vocabulary "
            f"{config.vocab_size}), not for this target (hidden size {hidden}, vocabulary {vocab})",
            "train heads for this target with `specdec-local train-medusa --target ...`",
        )


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads for one target.

    Create untrained heads with :meth:`init`, load trained ones with
    :meth:`from_pretrained`. :meth:`forward` maps hidden states to head logits;
    :meth:`topk` gives each head's best candidate tokens.
    """

    def __init__(
        self, config: MedusaConfig, target: nn.Module | None = None, token_subset: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        out = config.subset_size or config.vocab_size
        extra = h if config.sequential else 0  # the first block of a sequential head reads a token embedding
        self.blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(h, extra if j == 0 else 0) for j in range(config.num_layers))
            for _ in range(config.num_heads)
        )
        self.proj: nn.ModuleList | None = None
        if config.own_lm_head:
            self.proj = nn.ModuleList(nn.Linear(h, out, bias=False) for _ in range(config.num_heads))
        if config.subset_size:
            if token_subset is None:
                token_subset = torch.arange(config.subset_size)
            token_subset = token_subset.long().flatten()
            if token_subset.numel() != config.subset_size:
                raise SpecdecError(f"token subset has {token_subset.numel()} ids, config says {config.subset_size}")
            self.register_buffer("token_subset", token_subset, persistent=True)
        else:
            self.token_subset = None
        self._shared: torch.Tensor | None = None  # [V', H], the target's lm_head (rows of the subset)
        self._embed: torch.Tensor | None = None  # [V, H], the target's input embedding (sequential heads)
        if target is not None:
            self.attach(target)

    # ------------------------------------------------------------------ creation
    @classmethod
    def init(
        cls,
        target: nn.Module,
        num_heads: int = DEFAULT_NUM_HEADS,
        num_layers: int = DEFAULT_NUM_LAYERS,
        own_lm_head: bool = False,
        token_subset: torch.Tensor | None = None,
        sequential: bool = False,
    ) -> "MedusaHeads":
        """Untrained heads for ``target`` (each starts as the target's own next-token prediction).

        Args:
            target: the causal LM whose final hidden state the heads read.
            num_heads: number of heads.
            num_layers: residual blocks per head.
            own_lm_head: give each head its own projection (initialised from the
                target's lm_head) instead of sharing it.
            token_subset: ``[V']`` token ids the heads may propose (None = all).
            sequential: each head also reads the token before its guess (Hydra-style).
        """
        hidden, vocab = _target_dims(target)
        if token_subset is not None:
            token_subset = torch.as_tensor(token_subset).long().flatten().cpu()
            if token_subset.numel() == 0 or int(token_subset.max()) >= vocab or int(token_subset.min()) < 0:
                raise SpecdecError(f"token subset must be non-empty ids below the vocabulary size {vocab}")
        config = MedusaConfig(
            hidden_size=hidden,
            vocab_size=vocab,
            num_heads=num_heads,
            num_layers=num_layers,
            own_lm_head=own_lm_head,
            subset_size=0 if token_subset is None else int(token_subset.numel()),
            base_model_name_or_path=_target_name(target),
            model_type=str(getattr(target.config, "model_type", "")),
            fingerprint=target_fingerprint(target),
            sequential=sequential,
        )
        heads = cls(config, token_subset=token_subset)
        weight = output_weight(target)
        ref = next(target.parameters())
        heads.to(device=ref.device, dtype=ref.dtype)
        if heads.proj is not None:
            rows = weight if heads.token_subset is None else weight[heads.token_subset.to(weight.device)]
            with torch.no_grad():
                for p in heads.proj:
                    p.weight.copy_(rows.to(p.weight.dtype))
        heads.attach(target)
        return heads

    def attach(self, target: nn.Module) -> None:
        """Check that the heads fit ``target`` and, for a shared lm_head, take its weight."""
        self.check_target(target)
        if self.proj is None:
            weight = output_weight(target)
            if self.token_subset is not None:
                weight = weight.index_select(0, self.token_subset.to(weight.device))
            self._shared = weight
        if self.config.sequential:
            self._embed = input_weight(target)
        ref = next(target.parameters())
        self.to(device=ref.device)

    def check_target(self, target: nn.Module) -> None:
        """Raise :class:`SpecdecError` unless these heads were made for ``target``."""
        check_sizes(self.config, target)
        cfg = self.config
        name = cfg.base_model_name_or_path or "another model"
        if cfg.fingerprint:
            mine = torch.tensor(target_fingerprint(target))
            theirs = torch.tensor(cfg.fingerprint)
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=_FINGERPRINT_RTOL, atol=1e-3):
                raise SpecdecError(
                    f"these Medusa heads were trained for {name}, whose output layer differs from this target's",
                    "heads only help the exact model they were trained on; train heads for this target "
                    "with `specdec-local train-medusa --target ...`",
                )

    # ------------------------------------------------------------------ compute
    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[...]`` token ids -> ``[..., H]`` the target's input embeddings, RMS-normalised (sequential heads)."""
        if self._embed is None:
            raise SpecdecError(
                "these sequential Medusa heads are not attached to a target",
                "call heads.attach(target) or load them with MedusaHeads.from_pretrained(dir, target)",
            )
        e = self._embed[tokens.to(self._embed.device)].to(self._param_dtype())
        return e * torch.rsqrt(e.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(e.dtype)

    def head_state(self, k: int, state: torch.Tensor, token: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``k``'s blocks: ``[..., H]`` state (and ``[...]`` the token before its guess) -> ``[..., H]``.

        For plain heads ``state`` is the target's hidden state and ``token`` is ignored;
        for sequential heads ``state`` is head ``k - 1``'s output (``h_t`` for ``k = 0``).
        """
        extra = self.embed(token) if self.config.sequential else None
        z = state
        for j, block in enumerate(self.blocks[k]):
            z = block(z, extra if j == 0 else None)
        return z

    def transform(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., H]`` -> ``[..., K, H]``: each head's blocks (K = num_heads).

        Sequential heads need ``prev [..., K]``: the token before each head's guess
        (``x_{t+1} .. x_{t+K}``, the target's own tokens when training); plain heads ignore it.
        """
        if self.config.sequential and prev is None:
            raise SpecdecError("sequential Medusa heads need the tokens before their guesses (prev)")
        outs = []
        z = hidden
        for k in range(self.num_heads):
            if self.config.sequential:
                z = self.head_state(k, z, prev[..., k])
                outs.append(z)
            else:
                outs.append(self.head_state(k, hidden))
        return torch.stack(outs, dim=-2)

    def project_head(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` head ``k``'s state -> ``[..., V']`` its logits over the head vocabulary."""
        if self.proj is not None:
            return self.proj[k](z)
        if self._shared is None:
            raise SpecdecError(
                "these Medusa heads share the target's lm_head but are not attached to a target",
                "call heads.attach(target) or load them with MedusaHeads.from_pretrained(dir, target)",
            )
        return z @ self._shared.to(z.dtype).T

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., K, H]`` -> ``[..., K, V']`` logits over the head vocabulary (V' = subset or V)."""
        if self.proj is None:
            return self.project_head(0, z)
        return torch.stack([self.project_head(k, z[..., k, :]) for k in range(self.num_heads)], dim=-2)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., H]`` final hidden states (and, for sequential heads, ``prev [..., K]``) -> ``[..., K, V']`` logits."""
        return self.project(self.transform(hidden, prev))

    def to_vocab(self, index: torch.Tensor) -> torch.Tensor:
        """Map indices into the head vocabulary to token ids (identity without a subset)."""
        if self.token_subset is None:
            return index
        return self.token_subset.to(index.device)[index]

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """``[H]`` one hidden state -> ``[K, k]`` token ids, each head's ``k`` best, best first (plain heads)."""
        if self.config.sequential:
            raise SpecdecError("sequential Medusa heads guess along a path: use tree_tokens()")
        logits = self.forward(hidden.to(self._param_dtype()))  # [K, V']
        k = min(k, logits.shape[-1])
        return self.to_vocab(logits.topk(k, dim=-1).indices)

    @torch.no_grad()
    def tree_tokens(self, hidden: torch.Tensor, root: int, tree: TreeBuffers) -> torch.Tensor:
        """The token of every node of ``tree``: ``[H]`` the hidden state that gave ``root`` -> ``[n]`` ids.

        Plain heads: node ``[.., r]`` at depth ``d`` is head ``d - 1``'s rank-``r`` token.
        Sequential heads: the tree is read level by level, each node with children
        running the next head on its own path (one batched head call per depth).
        """
        hidden = hidden.to(self._param_dtype())
        if not self.config.sequential:
            top = self.topk(hidden, tree.topk)  # [K, topk]
            return top[tree.head_index, tree.rank.to(top.device)]
        parents, ranks, node_depth = tree.parents.tolist(), tree.rank.tolist(), tree.depths.tolist()
        tokens = [0] * tree.num_nodes
        has_children = set(parents)  # -1 (the root) included
        states: dict[int, torch.Tensor] = {}  # node (-1 = root) -> [H], its head's state after reading its token
        frontier = [-1]
        for depth in range(tree.max_depth):
            rows = [v for v in frontier if v in has_children]
            before = torch.stack([hidden if v < 0 else states[parents[v]] for v in rows])  # [r, H]
            read = torch.tensor([root if v < 0 else tokens[v] for v in rows], device=hidden.device)  # [r]
            z = self.head_state(depth, before, read)  # [r, H]
            logits = self.project_head(depth, z)  # [r, V']
            top = self.to_vocab(logits.topk(min(tree.topk, logits.shape[-1]), dim=-1).indices).tolist()
            states.update(zip(rows, z))
            where = {v: i for i, v in enumerate(rows)}
            frontier = [c for c in range(tree.num_nodes) if node_depth[c] == depth + 1]
            for c in frontier:
                tokens[c] = top[where[parents[c]]][ranks[c]]
        return torch.tensor(tokens, dtype=torch.long)

    @torch.no_grad()
    def dynamic_tree(
        self, hidden: torch.Tensor, root: int, num_nodes: int, branch: int = 8, beam: int = 4
    ) -> tuple[list[int], list[int], list[float]]:
        """A tree chosen for this step from the heads' own confidence (after EAGLE-2, arXiv 2406.16858).

        A node's score is the product of the heads' probabilities along its path.
        Level by level, the ``beam`` best nodes of the newest level are expanded
        into their head's ``branch`` best tokens (sequential heads: one batched
        head call per level, each row reading its own path; plain heads: one call
        for all levels, since their guesses do not depend on the path). The
        ``num_nodes`` best-scoring nodes are kept; a child never outscores its
        parent, so they form a tree. Levels stop early once none of their nodes
        could enter the kept set.

        Args:
            hidden: ``[H]`` the target's final hidden state that gave ``root``.
            root: the token the target gave there (the tree's root).
            num_nodes: most nodes to keep.
            branch: candidates per expanded node.
            beam: nodes expanded per level.
        Returns:
            ``(tokens, parents, probs)``, each of length ``<= num_nodes``, best
            first: every prefix is a tree (a parent before its children, siblings
            best first); parent ``-1`` = child of the root; ``probs`` is each
            node's score as a probability (the heads' estimate that its whole
            path is the target's), never increasing.
        """
        hidden = hidden.to(self._param_dtype())
        if num_nodes <= 0:
            return [], [], []
        plain = None
        if not self.config.sequential:
            plain = torch.log_softmax(self.forward(hidden).float(), dim=-1)  # [K, V']
        nodes: list[tuple[float, int, int, int]] = []  # (log-probability of the path, depth, token, parent node)
        level: list[int] = [-1]  # node indices of the newest level (-1 = the root)
        level_states = hidden.unsqueeze(0)  # [r, H] the state each node of the level hands to the next head
        for depth in range(self.num_heads):
            kept = sorted((node[0] for node in nodes), reverse=True)
            floor = kept[num_nodes - 1] if len(kept) >= num_nodes else float("-inf")
            scores = [0.0 if v < 0 else nodes[v][0] for v in level]
            order = [i for i in sorted(range(len(level)), key=lambda i: -scores[i])[:beam] if scores[i] > floor]
            if not order:
                break
            if plain is not None:
                logp = plain[depth].expand(len(order), -1)  # [r, V']
            else:
                read = torch.tensor(
                    [root if level[i] < 0 else nodes[level[i]][2] for i in order], device=hidden.device
                )  # [r]
                states = self.head_state(depth, level_states[order], read)  # [r, H]
                logp = torch.log_softmax(self.project_head(depth, states).float(), dim=-1)  # [r, V']
            top = logp.topk(min(branch, logp.shape[-1]), dim=-1)
            values, tokens = top.values.tolist(), self.to_vocab(top.indices).tolist()
            parents, level, rows = level, [], []
            for r, i in enumerate(order):
                for value, token in zip(values[r], tokens[r]):
                    level.append(len(nodes))
                    rows.append(r)
                    nodes.append((scores[i] + value, depth + 1, token, parents[i]))
            if plain is None:
                level_states = states[torch.tensor(rows, device=states.device)]
        chosen: list[int] = []
        where: dict[int, int] = {}
        for v in sorted(range(len(nodes)), key=lambda v: (-nodes[v][0], nodes[v][1])):
            if len(chosen) >= num_nodes:
                break
            if nodes[v][3] < 0 or nodes[v][3] in where:
                where[v] = len(chosen)
                chosen.append(v)
        return (
            [nodes[v][2] for v in chosen],
            [where[nodes[v][3]] if nodes[v][3] >= 0 else -1 for v in chosen],
            [math.exp(nodes[v][0]) for v in chosen],
        )

    def _param_dtype(self) -> torch.dtype:
        return self.blocks[0][0].linear.weight.dtype

    # ------------------------------------------------------------------ disk
    def save(self, directory: str | Path) -> Path:
        """Write ``medusa_heads.safetensors`` and ``medusa_config.json`` into ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(out / WEIGHTS_NAME) as tmp:  # each file whole or not at all (Ctrl-C during a save)
            save_file(state, str(tmp), metadata={"format": "specdec-medusa"})
        write_atomic(out / CONFIG_NAME, json.dumps(asdict(self.config), indent=2))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, target: nn.Module) -> "MedusaHeads":
        """Load heads saved by :meth:`save`, or in the Medusa project's published layout.

        Raises :class:`SpecdecError` if the folder holds neither, or if the heads
        were trained for another target.
        """
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise SpecdecError(
                f"{path} is a file, not a folder of Medusa heads"
                if path.exists()
                else f"Medusa heads folder not found: {path}",
                "give the --out folder of `specdec-local train-medusa`",
            )
        if (path / CONFIG_NAME).is_file():
            heads = cls._load_native(path, target)
        elif (path / PUBLISHED_CONFIG).is_file() and any((path / w).is_file() for w in PUBLISHED_WEIGHTS):
            heads = cls._load_published(path, target)
        else:
            raise SpecdecError(
                f"{path} holds no Medusa heads",
                f"expected {CONFIG_NAME} + {WEIGHTS_NAME} (specdec) or config.json + "
                "medusa_lm_head.safetensors/.pt (Medusa project)",
            )
        heads.to(dtype=next(target.parameters()).dtype)
        heads.attach(target)
        return heads.eval()

    @classmethod
    def _load_native(cls, path: Path, target: nn.Module) -> "MedusaHeads":
        try:
            config = MedusaConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise SpecdecError(
                f"unreadable Medusa config {path / CONFIG_NAME}: {e}",
                "the folder may be damaged: train the heads again or copy them anew",
            ) from None
        check_sizes(config, target)
        if not (path / WEIGHTS_NAME).is_file():
            raise SpecdecError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        state = _read_safetensors(path / WEIGHTS_NAME)
        subset = state.get("token_subset")
        if subset is not None and subset.numel() and (int(subset.min()) < 0 or int(subset.max()) >= config.vocab_size):
            raise SpecdecError(
                f"Medusa weights in {path / WEIGHTS_NAME}: token_subset has ids outside [0, {config.vocab_size})",
                "the file is damaged or was not written by specdec: train the heads again",
            )
        heads = cls(config, token_subset=subset)
        _load_state(heads, state, path / WEIGHTS_NAME)
        return heads

    @classmethod
    def _load_published(cls, path: Path, target: nn.Module) -> "MedusaHeads":
        try:
            raw = json.loads((path / PUBLISHED_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise SpecdecError(f"unreadable Medusa config {path / PUBLISHED_CONFIG}: {e}") from None
        if "medusa_num_heads" not in raw:
            raise SpecdecError(f"{path / PUBLISHED_CONFIG} has no medusa_num_heads: not a Medusa checkpoint")
        state = _read_published_weights(path)
        num_heads = int(raw["medusa_num_heads"])
        num_layers = int(raw.get("medusa_num_layers", 1))
        state = {k.removeprefix("medusa_head."): v for k, v in state.items()}
        try:
            proj0 = state[f"0.{num_layers}.weight"]
        except KeyError:
            raise SpecdecError(
                f"Medusa weights in {path} lack the key '0.{num_layers}.weight' of the published layout"
            ) from None
        vocab, hidden = int(proj0.shape[0]), int(proj0.shape[1])
        config = MedusaConfig(
            hidden_size=hidden,
            vocab_size=vocab,
            num_heads=num_heads,
            num_layers=num_layers,
            own_lm_head=True,
            base_model_name_or_path=str(raw.get("base_model_name_or_path", "")),
        )
        check_sizes(config, target)
        mapped: dict[str, torch.Tensor] = {}
        for i in range(num_heads):
            for j in range(num_layers):
                for p in ("weight", "bias"):
                    mapped[f"blocks.{i}.{j}.linear.{p}"] = state.get(f"{i}.{j}.linear.{p}")
            mapped[f"proj.{i}.weight"] = state.get(f"{i}.{num_layers}.weight")
        missing = [k for k, v in mapped.items() if v is None]
        if missing:
            raise SpecdecError(
                f"Medusa weights in {path} miss {len(missing)} tensors (e.g. {missing[0]})",
                "the checkpoint does not match its config.json (medusa_num_heads/medusa_num_layers)",
            )
        heads = cls(config)
        _load_state(heads, mapped, path)
        return heads


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated or corrupt file is a :class:`SpecdecError`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError (truncated, bad header) or OSError
        raise SpecdecError(
            f"unreadable Medusa weights {file}: {type(e).__name__}: {e}",
            "the file may be truncated or corrupt: train the heads again or copy them anew",
        ) from None


def _read_published_weights(path: Path) -> dict[str, torch.Tensor]:
    sft = path / PUBLISHED_WEIGHTS[0]
    if sft.is_file():
        return _read_safetensors(sft)
    pt = path / PUBLISHED_WEIGHTS[1]
    try:
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickles; anything else is unreadable too
        raise SpecdecError(
            f"refusing to load {pt}: it is not a plain tensor state dict ({type(e).__name__})",
            "only weights-only .pt files are loaded (no arbitrary pickles); convert it to safetensors",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecdecError(f"{pt} is not a state dict of tensors")
    return state


def _load_state(heads: MedusaHeads, state: dict[str, torch.Tensor], where: Path) -> None:
    own = heads.state_dict()
    for k, v in own.items():
        if k not in state:
            raise SpecdecError(f"Medusa weights in {where} lack '{k}'")
        if tuple(state[k].shape) != tuple(v.shape):
            raise SpecdecError(
                f"Medusa weights in {where}: '{k}' has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
            )
    heads.load_state_dict({k: state[k] for k in own}, strict=True)
