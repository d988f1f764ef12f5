"""What specdec reads off a transformers causal LM: its decoder body, context length and EOS ids."""

from __future__ import annotations

from typing import Any

import torch

from .errors import SpecdecError


def decoder_body(target: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack under the LM head (``model.model`` for Llama and Qwen2)."""
    body = target.get_decoder() if hasattr(target, "get_decoder") else getattr(target, "model", None)
    if body is None:
        raise SpecdecError(f"cannot find the decoder body of {type(target).__name__}")
    return body


def embedding_rows(layer: torch.nn.Module | None) -> int | None:
    """Rows ``V`` of an embedding or output layer (None when it has no dense weight)."""
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def output_rows(model: torch.nn.Module) -> int:
    """Rows ``V`` of ``model``'s output layer: the vocabulary its logits cover."""
    return int(model.get_output_embeddings().weight.shape[0])


def eos_token_ids(model: torch.nn.Module, tokenizer: Any = None) -> set[int]:
    """Every EOS id of ``model``'s generation config (else the tokenizer's; empty if neither has one)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in ([ids] if isinstance(ids, int) else ids)}


def model_context_length(model: torch.nn.Module) -> int:
    """Positions ``model`` was made for (its config's maximum; 2048 when it names none)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
