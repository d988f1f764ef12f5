"""specdec: lossless speculative decoding for local LLMs.

Public names are imported lazily, so ``import specdec`` (and the CLI's start)
does not pay for importing transformers until a model is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SpeculativeGenerator": "specdec.engine",
    "GenerationResult": "specdec.engine",
    "GenerationStats": "specdec.engine",
    "StreamEvent": "specdec.engine",
    "SamplingConfig": "specdec.sampling",
    "METHODS": "specdec.proposers",
    "NoneOptions": "specdec.proposers",
    "DraftOptions": "specdec.proposers",
    "PromptLookupOptions": "specdec.proposers",
    "LookaheadOptions": "specdec.proposers",
    "MedusaOptions": "specdec.proposers",
    "load": "specdec.loading",
    "load_model": "specdec.loading",
    "MedusaHeads": "specdec.medusa",
    "SpecdecError": "specdec.errors",
    "ModelNotFoundError": "specdec.errors",
    "VocabularyMismatchError": "specdec.errors",
    "MissingDraftError": "specdec.errors",
    "MissingHeadsError": "specdec.errors",
    "ChatContentError": "specdec.errors",
    "ContextLengthError": "specdec.errors",
    "InvalidSamplingError": "specdec.errors",
    "UnknownMethodError": "specdec.errors",
    "ForeignOptionsError": "specdec.errors",
    "MissingExtraError": "specdec.errors",
    "UnsupportedModelError": "specdec.errors",
    "StaticCacheMemoryError": "specdec.errors",
    "GeneratorBusyError": "specdec.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'specdec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = list(_EXPORTS)
