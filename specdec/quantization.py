"""Quantization kinds: what each costs in memory and how to ask transformers for it.

Kinds (the names profiles and :class:`~specdec.profiles.Selection` use):

========  ==========================================================  ==========
kind      how it is loaded                                            extra
========  ==========================================================  ==========
fp32      unquantized, float32                                        -
bf16      unquantized, in the run's dtype: bfloat16 (float16 on GPUs  -
          without it, float32 on CPUs without bf16 instructions)
fp16      unquantized, in the run's dtype, as bf16                    -
int8      bitsandbytes LLM.int8 on load                               ``bnb``
nf4       bitsandbytes 4-bit NormalFloat, double quantization         ``bnb``
fp4       bitsandbytes 4-bit float, double quantization               ``bnb``
gptq      a GPTQ checkpoint (its config rides in the checkpoint),     ``gptq``
          through transformers + optimum + gptqmodel
gguf      a ``.gguf`` file, de-quantized by transformers to the dtype -
========  ==========================================================  ==========

Backends are imported lazily. A missing one gives :class:`MissingExtraError`
("install specdec[bnb]"), or with ``fallback=True`` an unquantized load and a
note saying which fallback was taken.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

from .errors import MissingExtraError, SpecdecError

FLOAT_KINDS: tuple[str, ...] = ("fp32", "bf16", "fp16")
BNB_KINDS: tuple[str, ...] = ("int8", "nf4", "fp4")
KINDS: tuple[str, ...] = (*FLOAT_KINDS, *BNB_KINDS, "gptq", "gguf")

# bits per weight of a quantized transformer-block matrix, scales included:
# bnb int8 keeps one fp32 scale per row; nf4/fp4 one 8-bit absmax per 64 weights
# (double quantization) plus one fp32 per 256 blocks; GPTQ int4 a 16-bit scale
# and a 4-bit zero per group of 128, plus the permutation index.
_QUANTIZED_BITS = {"int8": 8.05, "nf4": 4.13, "fp4": 4.13, "gptq": 4.25}

# what each kind needs installed: (extra, import names, purpose)
_BACKENDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "int8": ("bnb", ("bitsandbytes",), "8-bit quantization (bitsandbytes)"),
    "nf4": ("bnb", ("bitsandbytes",), "4-bit NF4 quantization (bitsandbytes)"),
    "fp4": ("bnb", ("bitsandbytes",), "4-bit FP4 quantization (bitsandbytes)"),
    "gptq": ("gptq", ("optimum", "gptqmodel"), "loading GPTQ checkpoints"),
    "gguf": ("gguf", ("gguf",), "loading GGUF files"),
}


def check_kind(kind: str) -> str:
    """``kind`` if known, else a :class:`SpecdecError` listing the kinds."""
    if kind not in KINDS:
        raise SpecdecError(f"unknown quantization {kind!r}", f"choose one of: {', '.join(KINDS)}")
    return kind


def weight_bits(kind: str, dtype_bits: int = 16) -> float:
    """Bits per transformer-block weight when loaded as ``kind`` (compute dtype ``dtype_bits``)."""
    check_kind(kind)
    if kind == "fp32":
        return 32.0
    if kind in ("bf16", "fp16"):
        return 16.0
    if kind == "gguf":  # transformers de-quantizes GGUF to the dtype
        return float(dtype_bits)
    return _QUANTIZED_BITS[kind]


def embedding_bits(kind: str, dtype_bits: int = 16) -> float:
    """Bits per embedding / ``lm_head`` weight: quantizers leave them in the compute dtype."""
    check_kind(kind)
    return 32.0 if kind == "fp32" else 16.0 if kind in ("bf16", "fp16") else float(dtype_bits)


def missing_extra(kind: str) -> MissingExtraError | None:
    """The error a load as ``kind`` would hit now (None when its backend is installed)."""
    backend = _BACKENDS.get(check_kind(kind))
    if backend is None:
        return None
    extra, packages, purpose = backend
    for package in packages:
        if importlib.util.find_spec(package) is None:
            return MissingExtraError(extra, package, purpose)
    return None


def available_kinds() -> frozenset[str]:
    """Kinds whose backend is installed (float kinds always)."""
    return frozenset(kind for kind in KINDS if missing_extra(kind) is None)


@dataclass(frozen=True)
class QuantizationChoice:
    """The outcome of :func:`build_quantization_config`.

    Attributes:
        kind: the kind that will be loaded (the requested one, or the fallback).
        requested: the kind asked for.
        config: ``quantization_config`` for ``from_pretrained`` (None for float
            kinds, GGUF, and GPTQ whose checkpoint carries its own).
        note: why a fallback was taken; None when none was.
    """

    kind: str
    requested: str
    config: Any = None
    note: str | None = None


def build_quantization_config(kind: str, compute_dtype: Any = None, *, fallback: bool = False) -> QuantizationChoice:
    """The ``quantization_config`` that loads a model as ``kind``.

    Args:
        kind: one of :data:`KINDS`.
        compute_dtype: torch dtype of the de-quantized matmuls (bitsandbytes);
            default bfloat16.
        fallback: when the backend is missing, load unquantized in
            ``compute_dtype`` and say so in ``note``, instead of raising.
    Raises:
        MissingExtraError: the backend is not installed and ``fallback`` is False.
    """
    import torch

    compute_dtype = compute_dtype or torch.bfloat16
    error = missing_extra(kind)
    if error is not None:
        if not fallback:
            raise error
        float_kind = {torch.float32: "fp32", torch.float16: "fp16"}.get(compute_dtype, "bf16")
        note = f"{error.message} Fell back to loading unquantized ({float_kind}), which needs more memory; {error.hint}"
        if kind == "gptq":
            note += ". A GPTQ checkpoint cannot be loaded without it: use the unquantized checkpoint instead"
        return QuantizationChoice(float_kind, kind, None, note)
    if kind in BNB_KINDS:
        from transformers import BitsAndBytesConfig

        if kind == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
            _say_once(BNB_INT8_LOGGER, BNB_INT8_CAST)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=kind,
                bnb_4bit_compute_dtype=compute_dtype,
                bnb_4bit_use_double_quant=True,
            )
        return QuantizationChoice(kind, kind, config)
    return QuantizationChoice(kind, kind, None)


BNB_INT8_LOGGER = "bitsandbytes.autograd._functions"
BNB_INT8_CAST = "MatMul8bitLt: inputs will be cast"
"""bitsandbytes logs this warning on every int8 product whose input is not float16: 1,680 lines for 8 tokens
of a 135M model on a CPU. It describes how the layer computes, once is enough."""


class _Once(logging.Filter):
    """Lets the first record whose message starts with ``prefix`` through, and drops the later ones."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def _say_once(logger_name: str, prefix: str) -> None:
    """Show the log line of ``logger_name`` that starts with ``prefix`` once per process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _Once) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_Once(prefix))


def torch_dtype_name(kind: str, default: str) -> str:
    """The ``dtype`` argument of :func:`specdec.loading.load_model` for a float kind, else ``default``."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(kind, default)
