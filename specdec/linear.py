"""float32 linear layers on a CPU, computed so that a few rows cost about what one row costs.

A verify step runs the target over a handful of rows. In float32 on a CPU, ``nn.Linear`` computes them
as ``x @ W.T``, and for 2 to 16 rows that product runs on a path several times slower per row than
the one-row product: the Qwen2.5-1.5B MLP's 8960x1536 weight took 4.1 ms for one row and 8.5/10.1 ms
for 2/4 rows, while the same product written ``W @ x.T`` took 3.9/4.5 ms (2 cores, AVX512; the AVX2
figures, where this was found, are alike: docs/design.md, "Cost of a forward by row count"). The
whole 1.5B forward in float32 cost 1.97x one row at 2 rows.

:class:`FewRowLinear` is an ``nn.Linear`` that takes the fast form for 2 to :data:`FEW_ROWS` rows of
float32 on a CPU and is ``nn.Linear`` otherwise (one row, prefill, 16-bit floats, GPUs);
:func:`use_few_row_linears` puts it in place of a loaded model's ``nn.Linear`` modules, sharing
their parameters (tied weights stay tied). The two forms sum in another order, so results differ
in the last bits, as ``nn.Linear``'s own one-row and many-row paths already do.
"""

from __future__ import annotations

import torch
from torch import nn

# Most rows computed as W @ x.T: beyond them x @ W.T was as fast or faster (64 rows of the
# 8960x1536 weight: 19 ms against 24 ms; the whole 1.5B at 32 rows: 1.35 s against 1.77 s).
FEW_ROWS = 32


class FewRowLinear(nn.Linear):
    """``nn.Linear`` whose 2..:data:`FEW_ROWS`-row float32 CPU products run as ``W @ x.T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in_features]`` -> ``[..., out_features]``."""
        rows = x.numel() // self.in_features
        if not (1 < rows <= FEW_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"):
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        out = torch.mm(self.weight, flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().reshape(*x.shape[:-1], self.out_features)


def use_few_row_linears(model: nn.Module) -> int:
    """Put a :class:`FewRowLinear` in place of every plain ``nn.Linear`` of ``model`` (float32, CPU).

    Only modules whose type is exactly ``nn.Linear`` and that carry no hooks are replaced (quantized
    layers and anything wrapped stay as they are); the new module holds the same parameter objects.
    Returns how many were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child._forward_hooks or child._forward_pre_hooks:
                continue
            if child.weight.dtype != torch.float32 or child.weight.device.type != "cpu":
                continue
            few = FewRowLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            few.weight = child.weight
            if child.bias is not None:
                few.bias = child.bias
            few.train(child.training)
            setattr(parent, name, few)
            replaced += 1
    return replaced
