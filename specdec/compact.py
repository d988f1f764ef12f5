"""A cheaper copy of the draft model, used only to propose tokens.

What the draft proposes never changes what specdec outputs (the target
verifies every token, and sampling corrects for the draft's distribution), so
the draft may run at lower precision. On a CPU a one-token forward is bound by
reading the weights: the 0.5B draft spends ~80% of its forward in matrix
products, and bfloat16 matrix-vector products read ~10-14 GB/s here. Storing
the draft's ``nn.Linear`` weights as int8 with one scale per output row and
multiplying with torch's weight-only int8 kernel (``aten._weight_int8pack_mm``)
halves the bytes read; see docs/design.md and the bench for measured effects.

:func:`int8_draft` returns a *copy* of the draft whose module tree is new but
whose non-linear parameters (embeddings, norms) and buffers are shared with
the original, so the extra memory is the int8 weights (about half of the
draft's linear layers in bf16). The original model is left untouched; its
dense weights serve forwards over more than ``KERNEL_MAX_ROWS`` rows (a
prompt, or drafted text checked against a context copy), where a matrix
product beats the per-row int8 kernel.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# the int8 kernel is a matrix-vector product per row, so its cost grows with
# the rows, while a dense matrix product over a few rows costs about what one
# row does. Measured here (whole 0.5B draft, bf16, 2 threads, 300 cached
# positions), ms for 1/2/4/8/16 rows: int8 52/56/64/111/181, dense bf16
# 84/83/88/104/123. More rows than this use the original dense weight.
KERNEL_MAX_ROWS = 6


class Int8Linear(torch.nn.Module):
    """``y = x @ (scale * w_int8).T + bias`` with per-output-row symmetric int8 weights.

    Attributes:
        weight: ``[out_features, in_features]`` int8.
        scales: ``[out_features]`` in the layer's original dtype.
        bias: ``[out_features]`` or None.
        dense: the original ``[out_features, in_features]`` weight (shared, not
            copied), used for forwards over more than ``KERNEL_MAX_ROWS`` rows;
            None de-quantizes instead.
    """

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dense: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.bias = bias
        self.dense = dense
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        absmax = w.abs().amax(dim=1).float().clamp(min=1e-8)  # [out]
        scales = absmax / 127.0
        q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(q.contiguous(), scales.to(w.dtype), bias, dense=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in_features]`` -> ``[..., out_features]``."""
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= KERNEL_MAX_ROWS and flat.device.type == "cpu" and flat.dtype in _KERNEL_DTYPES:
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales.to(flat.dtype))
        elif self.dense is not None and self.dense.device == flat.device:  # several rows: the original weight
            # (2D input: a 3D one can make matmul copy the transposed [in, out] weight, ~0.5 s for the lm_head)
            y = F.linear(flat.contiguous(), self.dense, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        else:  # no dense weight kept: de-quantize, then one matrix product
            y = F.linear(flat, self.weight.to(flat.dtype) * self.scales.to(flat.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def int8_available(model: torch.nn.Module) -> bool:
    """Whether the int8 kernel runs for ``model`` (CPU weights in bf16, fp16 or fp32)."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    return p.device.type == "cpu" and p.dtype in _KERNEL_DTYPES and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_draft(draft: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``draft`` whose ``nn.Linear`` layers (lm_head included) are :class:`Int8Linear`.

    Parameters and buffers other than the replaced weights are shared with
    ``draft`` (not copied); ``draft`` itself is not modified.
    """
    memo = {id(t): t for t in (*draft.parameters(), *draft.buffers())}
    clone = copy.deepcopy(draft, memo)
    linears = [(name, m) for name, m in clone.named_modules() if type(m) is torch.nn.Linear]
    for name, module in linears:
        clone.set_submodule(name, Int8Linear.from_linear(module))
    return clone.eval()
