"""specdec: lossless speculative decoding for local LLMs."""
from __future__ import annotations

from .engine import GenerationResult, GenerationStats, SpeculativeGenerator, StreamEvent
from .errors import (
    ContextLengthError,
    InvalidSamplingError,
    MissingExtraError,
    ModelNotFoundError,
    SpecdecError,
    UnknownMethodError,
    VocabularyMismatchError,
)
from .proposers import METHODS
from .sampling import SamplingConfig

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load target (and draft) by name, folder or .gguf file; see :func:`specdec.loading.load`."""
    from .loading import load as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):
    if name == "MedusaHeads":
        from .medusa import MedusaHeads

        return MedusaHeads
    raise AttributeError(name)


__all__ = [
    "SpeculativeGenerator",
    "GenerationResult",
    "GenerationStats",
    "StreamEvent",
    "SamplingConfig",
    "METHODS",
    "load",
    "SpecdecError",
    "ModelNotFoundError",
    "VocabularyMismatchError",
    "ContextLengthError",
    "InvalidSamplingError",
    "UnknownMethodError",
    "MissingExtraError",
]
