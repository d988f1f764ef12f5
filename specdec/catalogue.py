"""Draft/target model families for auto-configuration, and the memory estimator.

Each :class:`ModelSpec` carries what the estimator needs (the architecture
numbers of the model's ``config.json``, plus the published parameter count as
a cross-check), its hub id, its quantized variants and, for targets, the
drafts worth trying in order of preference. A draft must share the target's
*tokenizer family* (the same ``family`` string as in
:data:`specdec.models.PACKAGED`): :func:`validate_catalogue` checks it.

Memory model (:func:`estimate_memory`), deliberately simple and documented:

* weights: every transformer-block parameter times the bits of its
  quantization; token embeddings and ``lm_head`` stay in 16-bit for
  bitsandbytes and GPTQ (they are not quantized there), and a GGUF file is
  de-quantized by transformers to the compute dtype;
* KV cache: ``2 x layers x kv_heads x head_dim x context x dtype bytes``;
* activations: the peak of one prefill over the whole assumed context
  (gate/up projections and residual stream; the engine keeps only the last
  position's logits there) plus fp32 logits for the widest verify step;
* a safety margin and a fixed reserve are added by the caller
  (:mod:`specdec.profiles`), since they depend on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import models
from .errors import SpecdecError
from .quantization import FLOAT_KINDS, embedding_bits, weight_bits


@dataclass(frozen=True)
class ModelSpec:
    """One model of the catalogue.

    Attributes:
        name: short name (``qwen2.5-7b``), accepted wherever a model is named.
        hub_id: the full-precision instruct checkpoint on the Hugging Face hub.
        family: tokenizer family; a draft must have the target's.
        params: published parameter count (checked against the config).
        num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
        head_dim, vocab_size, tie_embeddings, qkv_bias: from ``config.json``.
        variants: quantization kind -> reference of a pre-quantized
            checkpoint (``gptq``: a hub id; ``gguf``: a packaged model name).
            Float kinds and bitsandbytes quantize ``hub_id`` on load.
        drafts: names of drafts for this model as a target, preferred first.
        max_context: the model's context length.
    """

    name: str
    hub_id: str
    family: str
    params: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False
    variants: Mapping[str, str] = field(default_factory=dict)
    drafts: tuple[str, ...] = ()
    max_context: int = 32768

    @property
    def embedding_params(self) -> int:
        """Token embeddings plus an untied ``lm_head``."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def config_params(self) -> int:
        """Parameters counted from the architecture numbers."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        return self.num_layers * per_layer + h + self.embedding_params

    def kinds(self) -> tuple[str, ...]:
        """Quantization kinds this model can be loaded with (bitsandbytes and floats always)."""
        return (*FLOAT_KINDS, "int8", "nf4", "fp4", *self.variants)

    def reference(self, kind: str) -> str:
        """What to pass to :func:`specdec.loading.load_model` for quantization ``kind``."""
        return self.variants.get(kind, self.hub_id)


def _b(billions: float) -> int:
    return int(billions * 1e9)


def _qwen(
    name: str,
    hub: str,
    params: float,
    layers: int,
    hidden: int,
    inter: int,
    heads: int,
    kv: int,
    vocab: int,
    tied: bool,
    variants: dict[str, str],
    drafts: tuple[str, ...] = (),
) -> ModelSpec:
    return ModelSpec(
        name,
        hub,
        "qwen2.5",
        _b(params),
        layers,
        hidden,
        inter,
        heads,
        kv,
        hidden // heads,
        vocab,
        tied,
        qkv_bias=True,
        variants=variants,
        drafts=drafts,
    )


def _qwen_family(prefix: str, hub_prefix: str, gguf: Mapping[str, str]) -> list[ModelSpec]:
    """Qwen2.5 and Qwen2.5-Coder share sizes, architecture and tokenizer."""
    rows = (  # size, params (B), layers, hidden, intermediate, heads, kv heads, vocab, tied
        ("0.5b", 0.49, 24, 896, 4864, 14, 2, 151936, True),
        ("1.5b", 1.54, 28, 1536, 8960, 12, 2, 151936, True),
        ("3b", 3.09, 36, 2048, 11008, 16, 2, 151936, True),
        ("7b", 7.62, 28, 3584, 18944, 28, 4, 152064, False),
        ("14b", 14.77, 48, 5120, 13824, 40, 8, 152064, False),
    )
    drafts = {"1.5b": ("0.5b",), "3b": ("0.5b",), "7b": ("0.5b",), "14b": ("1.5b", "0.5b")}
    out = []
    for size, params, layers, hidden, inter, heads, kv, vocab, tied in rows:
        hub = f"{hub_prefix}-{size.upper()}-Instruct"
        variants = {"gptq": f"{hub}-GPTQ-Int4"}
        if size in gguf:
            variants["gguf"] = gguf[size]
        out.append(
            _qwen(
                f"{prefix}-{size}",
                hub,
                params,
                layers,
                hidden,
                inter,
                heads,
                kv,
                vocab,
                tied,
                variants,
                tuple(f"{prefix}-{d}" for d in drafts.get(size, ())),
            )
        )
    return out


_SPECS: list[ModelSpec] = [
    *_qwen_family("qwen2.5", "Qwen/Qwen2.5", {}),
    *_qwen_family("qwen2.5-coder", "Qwen/Qwen2.5-Coder", {"0.5b": "qwen-coder-0.5b", "1.5b": "qwen-coder-1.5b"}),
    ModelSpec(
        "llama-3.2-1b",
        "meta-llama/Llama-3.2-1B-Instruct",
        "llama3",
        _b(1.24),
        16,
        2048,
        8192,
        32,
        8,
        64,
        128256,
        True,
        max_context=131072,
    ),
    ModelSpec(
        "llama-3.2-3b",
        "meta-llama/Llama-3.2-3B-Instruct",
        "llama3",
        _b(3.21),
        28,
        3072,
        8192,
        24,
        8,
        128,
        128256,
        True,
        drafts=("llama-3.2-1b",),
        max_context=131072,
    ),
    ModelSpec(
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B-Instruct",
        "llama3",
        _b(8.03),
        32,
        4096,
        14336,
        32,
        8,
        128,
        128256,
        False,
        variants={"gptq": "hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4"},
        drafts=("llama-3.2-1b",),
        max_context=131072,
    ),
    ModelSpec(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "smollm2",
        134_515_008,
        30,
        576,
        1536,
        9,
        3,
        64,
        49152,
        True,
        variants={"gguf": "smollm2-135m"},
        max_context=8192,
    ),
    ModelSpec(
        "smollm2-360m",
        "HuggingFaceTB/SmolLM2-360M-Instruct",
        "smollm2",
        361_821_120,
        32,
        960,
        2560,
        15,
        5,
        64,
        49152,
        True,
        drafts=("smollm2-135m",),
        max_context=8192,
    ),
    ModelSpec(
        "smollm2-1.7b",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "smollm2",
        _b(1.71),
        24,
        2048,
        8192,
        32,
        32,
        64,
        49152,
        True,
        drafts=("smollm2-360m", "smollm2-135m"),
        max_context=8192,
    ),
]

CATALOGUE: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference as the user gave it, matched against the catalogue.

    Attributes:
        ref: the reference as given.
        spec: the catalogue entry (or one built from a local ``config.json``); None if unknown.
        fixed_kind: the quantization the reference implies (``gguf`` for a
            packaged name or ``.gguf`` file, ``gptq`` for a GPTQ hub id), or
            None when any kind may be chosen.
        is_short_name: the ref was a catalogue short name, so the chosen
            kind's variant checkpoint may replace it.
    """

    ref: str
    spec: ModelSpec | None
    fixed_kind: str | None = None
    is_short_name: bool = False

    def kinds(self) -> tuple[str, ...]:
        if self.fixed_kind:
            return (self.fixed_kind,)
        if self.spec is None:
            return ()
        kinds = self.spec.kinds()
        if not self.is_short_name:  # a hub id or folder: quantize it on load, do not swap checkpoints
            kinds = tuple(k for k in kinds if k not in self.spec.variants)
        return kinds

    def reference(self, kind: str) -> str:
        if self.is_short_name and self.spec is not None:
            return self.spec.reference(kind)
        return self.ref


def resolve(
    ref: str,
    catalogue: Mapping[str, ModelSpec] = CATALOGUE,
    config: Mapping[str, Any] | None = None,
    *,
    user: bool = False,
) -> ResolvedModel:
    """Match ``ref`` (short name, packaged name, hub id, ``.gguf`` file, folder) to the catalogue.

    ``config`` (a parsed ``config.json``) lets a local folder be estimated
    even when it is not in the catalogue. ``user``: the reference is the
    user's own (``--target``), so a name that is both a short name and a
    variant (``smollm2-135m``, also the packaged GGUF's name) means the
    variant the user can see in ``models list``, not whichever checkpoint
    a profile would choose.
    """
    key = ref.strip().lower()
    variant = next(
        ((spec, kind) for spec in catalogue.values() for kind, name in spec.variants.items() if key == name.lower()),
        None,
    )
    if variant is not None and (user or key not in catalogue):
        return ResolvedModel(ref, variant[0], fixed_kind=variant[1])
    if key in catalogue:
        return ResolvedModel(ref, catalogue[key], is_short_name=True)
    for spec in catalogue.values():
        if key == spec.hub_id.lower():
            return ResolvedModel(ref, spec)
    if key.endswith(".gguf"):
        return ResolvedModel(ref, None, fixed_kind="gguf")
    if config is not None:
        return ResolvedModel(ref, spec_from_config(ref, config, catalogue), fixed_kind=_config_kind(config))
    return ResolvedModel(ref, None)


def spec_from_config(name: str, config: Mapping[str, Any], catalogue: Mapping[str, ModelSpec] = CATALOGUE) -> ModelSpec:
    """A :class:`ModelSpec` from a transformers ``config.json`` (family guessed from the vocabulary)."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
        spec = ModelSpec(
            name=name,
            hub_id=name,
            family="",
            params=0,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config.get("intermediate_size", 4 * hidden)),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=vocab,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            max_context=int(config.get("max_position_embeddings", 32768)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SpecdecError(f"cannot estimate the memory of {name}: its config lacks {e}") from None
    family = next(
        (s.family for s in catalogue.values() if s.vocab_size == vocab and _model_type(s) == config.get("model_type")),
        "",
    )
    return ModelSpec(**{**spec.__dict__, "family": family, "params": spec.config_params})


def _model_type(spec: ModelSpec) -> str:
    return {"qwen2.5": "qwen2", "llama3": "llama", "smollm2": "llama"}.get(spec.family, "")


def _config_kind(config: Mapping[str, Any]) -> str | None:
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    return "gptq" if method == "gptq" else None


def drafts_for(target: ModelSpec, catalogue: Mapping[str, ModelSpec] = CATALOGUE) -> list[ModelSpec]:
    """Drafts for ``target``, preferred first: its listed drafts, else smaller models of its family."""
    if target.drafts:
        return [catalogue[name] for name in target.drafts if name in catalogue]
    if not target.family:
        return []
    smaller = [s for s in catalogue.values() if s.family == target.family and s.params * 4 <= target.params]
    return sorted(smaller, key=lambda s: -s.params)


def validate_catalogue(catalogue: Mapping[str, ModelSpec] = CATALOGUE) -> list[str]:
    """Problems of a catalogue (empty when sound): unknown drafts, tokenizer families, packaged names."""
    problems = []
    for spec in catalogue.values():
        for name in spec.drafts:
            draft = catalogue.get(name)
            if draft is None:
                problems.append(f"{spec.name}: draft {name!r} is not in the catalogue")
            elif draft.family != spec.family:
                problems.append(f"{spec.name}: draft {name} has tokenizer family {draft.family!r}, not {spec.family!r}")
            elif draft.params >= spec.params:
                problems.append(f"{spec.name}: draft {name} is not smaller than the target")
        packaged = spec.variants.get("gguf")
        if packaged is not None:
            if packaged not in models.PACKAGED:
                problems.append(f"{spec.name}: gguf variant {packaged!r} is not a packaged model")
            elif models.PACKAGED[packaged].family != spec.family:
                problems.append(f"{spec.name}: packaged {packaged} has family {models.PACKAGED[packaged].family!r}")
        if spec.params and abs(spec.config_params - spec.params) > 0.03 * spec.params:
            problems.append(f"{spec.name}: config gives {spec.config_params:,} parameters, published {spec.params:,}")
    return problems


# ---------------------------------------------------------------------- estimator
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one model needs, by part (margin and reserve not included)."""

    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        return MemoryEstimate(
            self.weights + other.weights, self.kv_cache + other.kv_cache, self.activations + other.activations
        )


def estimate_memory(
    spec: ModelSpec,
    kind: str,
    context_length: int,
    dtype_bits: int = 16,
    verify_tokens: int = 1,
    weights_loaded: bool = False,
) -> MemoryEstimate:
    """Bytes ``spec`` needs when loaded as ``kind`` and run over ``context_length`` tokens.

    Args:
        spec: the model.
        kind: quantization kind (``bf16``, ``nf4``, ``gptq``, ``gguf``...).
        context_length: tokens the KV cache must hold (and the longest prefill).
        dtype_bits: bits of the compute dtype (KV cache, activations,
            unquantized embeddings, de-quantized GGUF weights).
        verify_tokens: the widest forward after prefill (candidates + extra
            rows), whose logits are kept in fp32.
        weights_loaded: the weights are already in memory (the webui loaded
            the target), so only the cache and activations count.
    """
    context = min(context_length, spec.max_context)
    dtype_bytes = dtype_bits / 8
    if weights_loaded:
        weights = 0
    else:
        body = max(spec.config_params - spec.embedding_params, 0)
        weights = int(
            body * weight_bits(kind, dtype_bits) / 8 + spec.embedding_params * embedding_bits(kind, dtype_bits) / 8
        )
    kv = int(2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * context * dtype_bytes)
    prefill = context * (2 * spec.intermediate_size + 2 * spec.hidden_size) * dtype_bytes
    logits = max(verify_tokens, 1) * spec.vocab_size * 4
    return MemoryEstimate(weights, kv, int(prefill + logits))
