"""Hardware profiles and auto-configuration.

A *profile* (``profiles/*.yaml``) describes a tier of consumer hardware
(CPU-only, Apple unified memory, GPUs of 4/6/8/10-12/16/24+ GB): the methods
to try in order, the quantization of target and draft in order of
preference, ``num_speculative_tokens``, lookahead ``W/N/G``, the Medusa tree
size and the context length assumed for the KV cache.

:func:`select` is a pure function of (:class:`~specdec.hardware.DeviceInfo`,
catalogue, profiles, target) to a :class:`Selection` whose memory
estimate fits the device, found by falling back step by step and saying why
each earlier step was rejected::

    for each target (the user's, else the profile's suggestions, then the smaller tiers'):   select
      for each method of the profile (medusa, draft, lookahead, prompt_lookup, none):      _fit_target
        for each target quantization (profile order, smaller last):                        _fit_method
          draft:  for each draft (larger first), for each draft quantization               _fit_draft
          others: the target alone, plus the method's wider verify step
        -> the first that fits (else the smallest tried: _smallest_tried)

:func:`profile_settings` turns a profile's selection into the arguments of
:func:`specdec.load` (:class:`LoadArguments`) without overriding what the
caller gave explicitly, filling only the chosen method's options
(:func:`profile_options`); front ends (``generate --profile``, ``bench
--profile``, the webui) call it.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from . import catalogue as cat
from .errors import SpecdecError
from .hardware import BACKENDS, DeviceInfo, format_bytes, parse_size
from .proposers import REGISTRY, LookaheadOptions, MedusaOptions, MethodOptions, method_of, method_options
from .quantization import FLOAT_KINDS, KINDS, torch_dtype_name

log = logging.getLogger(__name__)

PROFILE_SUFFIX = ".yaml"
AUTO = "auto"


# ---------------------------------------------------------------------- schema
def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like 8GiB")
    if isinstance(value, (int, str)):
        return parse_size(value)
    raise ValueError("a size must be a number of bytes or a string like 8GiB")


Size = Annotated[int, BeforeValidator(_size), Field(ge=0)]
Kind = Literal["fp32", "bf16", "fp16", "int8", "nf4", "fp4", "gptq", "gguf"]
Method = Literal[tuple(REGISTRY)]  # a concrete method (not "auto")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    """Which devices a profile is for: backends and a range of *total* memory."""

    backends: list[Literal["cuda", "rocm", "mps", "cpu"]] = Field(min_length=1)
    min_memory: Size = 0
    max_memory: Size | None = Field(default=None, description="exclusive upper bound; none = no limit")

    @model_validator(mode="after")
    def _a_range(self) -> Match:
        if self.max_memory is not None and self.max_memory <= self.min_memory:
            raise ValueError(
                f"max_memory ({format_bytes(self.max_memory)}) must be above min_memory "
                f"({format_bytes(self.min_memory)}), or no device matches"
            )
        return self

    def covers(self, device: DeviceInfo) -> bool:
        return (
            device.backend in self.backends
            and device.total_bytes >= self.min_memory
            and (self.max_memory is None or device.total_bytes < self.max_memory)
        )


class Quantization(_Strict):
    """Quantization kinds in order of preference."""

    target: list[Kind] = Field(min_length=1)
    draft: list[Kind] = Field(min_length=1)


class Lookahead(_Strict):
    """Lookahead decoding: window ``W``, n-gram size ``N``, candidates per step ``G``."""

    window_size: int = Field(default=LookaheadOptions.window_size, ge=1)
    ngram_size: int = Field(default=LookaheadOptions.ngram_size, ge=2)
    guess_size: int = Field(default=LookaheadOptions.guess_size, ge=1)

    @property
    def verify_tokens(self) -> int:
        """Rows of one lookahead verify forward: the window's levels plus the guesses."""
        return (self.window_size + self.guess_size) * (self.ngram_size - 1) + 1


class Medusa(_Strict):
    """Medusa: the most nodes of the candidate tree (a per-step tree may keep fewer)."""

    tree_size: int | None = Field(default=MedusaOptions.tree_size, ge=1, description="null = no cap")


class Memory(_Strict):
    """How the estimate is padded: a fraction of it, plus a fixed reserve (CUDA context, desktop)."""

    margin: float = Field(default=0.10, ge=0.0, lt=1.0)
    reserve: Size = 0


class Profile(_Strict):
    """One hardware tier, as written in ``profiles/<name>.yaml``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str
    match: Match
    methods: list[Method] = Field(min_length=1)
    targets: list[str] = Field(min_length=1, description="suggested targets when the user names none")
    quantization: Quantization
    num_speculative_tokens: int | None = Field(default=None, ge=1, description="fixed draft length; null = adaptive")
    lookahead: Lookahead = Field(default_factory=Lookahead)
    medusa: Medusa = Field(default_factory=Medusa)
    context_length: int = Field(default=4096, ge=128, description="tokens the KV cache must hold")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    memory: Memory = Field(default_factory=Memory)

    @model_validator(mode="after")
    def _unique_methods(self) -> Profile:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must not repeat")
        return self


@dataclass(frozen=True)
class Problem:
    """One reason a profile file is invalid."""

    file: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.reason}"


class ProfileError(SpecdecError):
    """Invalid profile files; ``problems`` lists file, field and reason of each."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(
            "invalid profile:\n" + "\n".join(f"  {p}" for p in self.problems),
            "see `specdec-local profiles show cpu` for a valid profile",
        )


def _field_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def parse_profile(text: str, file: str = "<string>") -> Profile:
    """Validate one profile's YAML text; :class:`ProfileError` names file, field and reason."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(yaml)"
        raise ProfileError([Problem(file, where, f"not valid YAML: {getattr(e, 'problem', None) or e}")]) from None
    if not isinstance(data, dict):
        raise ProfileError([Problem(file, "(top level)", f"expected a mapping of fields, got {type(data).__name__}")])
    try:
        profile = Profile.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            reason = err["msg"]
            if err["type"] == "extra_forbidden":
                reason = "unknown field"
            elif err["type"] != "missing" and "input" in err:
                reason += f" (got {err['input']!r})"
            problems.append(Problem(file, _field_path(err["loc"]), reason))
        raise ProfileError(problems) from None
    stem = Path(file).stem
    if file != "<string>" and stem != profile.name:
        raise ProfileError([Problem(file, "name", f"must match the file name {stem!r} (got {profile.name!r})")])
    return profile


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError([Problem(str(path), "(file)", e.strerror or str(e))]) from None
    except UnicodeDecodeError as e:
        raise ProfileError([Problem(str(path), "(file)", f"not UTF-8 text (byte {e.start}): a YAML file?")]) from None
    return parse_profile(text, str(path))


def profiles_dir() -> Path:
    """Where the packaged profiles are: the checkout's ``profiles/``, else the installed copy.

    A wheel installs them as data files under ``<prefix>/share/specdec/profiles``.
    """
    checkout = Path(__file__).resolve().parents[1] / "profiles"
    if any(checkout.glob(f"*{PROFILE_SUFFIX}")):
        return checkout
    try:
        for file in metadata.files("specdec") or ():
            if file.parts[-3:-1] == ("specdec", "profiles") and file.name.endswith(PROFILE_SUFFIX):
                return Path(str(file.locate())).resolve().parent
    except metadata.PackageNotFoundError:
        pass
    for scheme in (None, "posix_user", "nt_user", "osx_framework_user"):
        try:
            base = sysconfig.get_path("data", scheme) if scheme else sysconfig.get_path("data")
        except KeyError:
            continue
        candidate = Path(base) / "share" / "specdec" / "profiles"
        if any(candidate.glob(f"*{PROFILE_SUFFIX}")):
            return candidate
    raise SpecdecError(
        "the packaged hardware profiles are missing", "reinstall specdec (pip install --force-reinstall specdec)"
    )


@lru_cache(maxsize=4)
def _load_dir(directory: str) -> tuple[Profile, ...]:
    problems: list[Problem] = []
    loaded = []
    for path in sorted(Path(directory).glob(f"*{PROFILE_SUFFIX}")):
        try:
            loaded.append(load_profile_file(path))
        except ProfileError as e:
            problems.extend(e.problems)
    if problems:
        raise ProfileError(problems)
    return tuple(loaded)


def load_profiles(directory: str | Path | None = None) -> list[Profile]:
    """Every profile of ``directory`` (default: the packaged ones), sorted by file name."""
    return list(_load_dir(str(directory or profiles_dir())))


def find_profile(name: str, profiles: Sequence[Profile]) -> Profile:
    """The profile called ``name`` among ``profiles``, or the profile file ``name`` (a path ending in .yaml or .yml)."""
    if name.endswith((PROFILE_SUFFIX, ".yml")):
        return load_profile_file(Path(name).expanduser())
    for profile in profiles:
        if profile.name == name:
            return profile
    raise SpecdecError(
        f"unknown profile {name!r}",
        f"profiles: auto, {', '.join(p.name for p in profiles)}, or a profile file (a path ending in {PROFILE_SUFFIX})",
    )


def match_profile(device: DeviceInfo, profiles: Sequence[Profile]) -> Profile:
    """The profile for ``device``: among those that cover it, the one with the largest lower bound."""
    covering = [p for p in profiles if p.match.covers(device)]
    if not covering:  # memory unknown or outside every range: the smallest tier of the backend
        covering = sorted(
            (p for p in profiles if device.backend in p.match.backends), key=lambda p: p.match.min_memory
        )[:1]
    if not covering:
        raise SpecdecError(
            f"no profile matches a {device.backend} device",
            f"profiles: {', '.join(p.name for p in profiles)}; choose one with --profile",
        )
    return max(covering, key=lambda p: p.match.min_memory)


# ---------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """What :func:`select` chose, with the estimate and the reasons for each fallback.

    ``target_ref``/``draft_ref`` are what to load (a hub id of a quantized
    variant, a packaged name...); ``target``/``draft`` are catalogue names
    when known, else the references as given.
    """

    profile: str
    device: DeviceInfo
    target: str
    target_ref: str
    draft: str | None
    draft_ref: str | None
    method: str
    target_quantization: str
    draft_quantization: str | None
    dtype: str
    num_speculative_tokens: int | None
    lookahead: Lookahead
    medusa_tree_size: int | None
    context_length: int
    estimated_bytes: int
    budget_bytes: int
    fits: bool
    reasons: tuple[str, ...] = ()
    breakdown: Mapping[str, int] = field(default_factory=dict)

    @property
    def estimated(self) -> bool:
        """Whether the memory was estimated (not for a target the catalogue does not know)."""
        return bool(self.breakdown)

    def to_dict(self) -> dict[str, Any]:
        """The object ``specdec-local detect --json`` prints."""
        return {
            "device": self.device.to_dict(),
            "profile": self.profile,
            "target": self.target_ref,
            "draft": self.draft_ref,
            "method": self.method,
            "quantization": {"target": self.target_quantization, "draft": self.draft_quantization},
            "num_speculative_tokens": self.num_speculative_tokens,
            "lookahead": self.lookahead.model_dump(),
            "estimated_bytes": int(self.estimated_bytes),
            "budget_bytes": int(self.budget_bytes),
            "fits": self.fits,
            "dtype": self.dtype,
            "context_length": self.context_length,
            "medusa": {"tree_size": self.medusa_tree_size},
            "reasons": list(self.reasons),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def padded(estimate: int, profile: Profile, reserve: bool = True) -> int:
    """An estimate plus the profile's margin (and reserve)."""
    return int(estimate * (1 + profile.memory.margin)) + (profile.memory.reserve if reserve else 0)


def compute_dtype(device: DeviceInfo, profile: Profile) -> str:
    """``bfloat16``/``float16``/``float32`` for quantized matmuls, KV cache and activations.

    ``auto``: bfloat16 where the device computes it natively; else float16 on a GPU and float32 on a
    CPU, where 16-bit floats without their instructions are converted row by row (slower than float32
    on long prompts and wide verify steps: docs/design.md, "Cost of a forward by row count").
    """
    if profile.dtype != AUTO:
        return profile.dtype
    if device.supports_bf16:
        return "bfloat16"
    return "float32" if device.backend == "cpu" else "float16"


_DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
_FLOAT_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _kinds(
    model: cat.ResolvedModel,
    preferred: Sequence[str],
    dtype: str,
    available: frozenset[str],
    reasons: list[str],
    role: str,
) -> list[str]:
    """The profile's kinds that ``model`` can be loaded as, in order; 16-bit floats follow the dtype."""
    own = model.kinds()
    if model.fixed_kind:  # a .gguf or GPTQ reference has only its own format
        kinds = [model.fixed_kind]
    else:
        kinds = []
        for kind in preferred:
            if kind in ("bf16", "fp16"):
                kind = _FLOAT_OF_DTYPE[dtype] if dtype != "float32" else "fp32"
            if kind in own and kind not in kinds:
                kinds.append(kind)
    usable = [k for k in kinds if k in available]
    for k in kinds:
        if k not in available:
            reasons.append(
                f"{role} {model.ref} as {k}: its backend is not installed "
                f"(install specdec[{'bnb' if k in ('int8', 'nf4', 'fp4') else k}])"
            )
    if not usable and not model.fixed_kind and model.spec is not None:
        float_kind = _FLOAT_OF_DTYPE[dtype]
        reasons.append(f"{role} {model.ref}: none of the profile's quantizations is installed, trying {float_kind}")
        usable = [float_kind]
    return usable


def suggested_targets(chosen: Profile, profiles: Sequence[Profile], backend: str) -> list[str]:
    """Targets to try when the user names none: ``chosen``'s, then those of every smaller tier.

    A smaller tier's targets are the way down when none of ``chosen``'s fits
    (e.g. its quantizations are not installed, so its targets load in 16-bit):
    tiers of the same backend first, larger first, then the other backends'
    smallest tiers (the CPU profile's small models are the last resort).
    """
    smaller = sorted(
        (p for p in profiles if p is not chosen and p.match.min_memory <= chosen.match.min_memory),
        key=lambda p: (backend not in p.match.backends, -p.match.min_memory),
    )
    return list(dict.fromkeys([*chosen.targets, *(name for p in smaller for name in p.targets)]))


def _missing_extras(reasons: Sequence[str]) -> list[str]:
    """The ``specdec[...]`` extras that the reasons say are not installed, bitsandbytes first."""
    found = {extra for r in reasons for extra in ("bnb", "gptq", "gguf") if f"install specdec[{extra}]" in r}
    return [f"specdec[{extra}]" for extra in ("bnb", "gptq", "gguf") if extra in found]


def select(
    device: DeviceInfo,
    catalogue: Mapping[str, cat.ModelSpec] = cat.CATALOGUE,
    profiles: Sequence[Profile] | None = None,
    target: str | cat.ResolvedModel | None = None,
    *,
    profile: str = AUTO,
    target_loaded: bool = False,
    has_medusa_heads: bool = False,
    available: Iterable[str] = KINDS,
) -> Selection:
    """Choose target/draft/method/quantization for ``device``; pure (no probing, no imports of backends).

    Args:
        device: what :func:`specdec.hardware.detect` found (or a fake one).
        catalogue: model specs (default :data:`specdec.catalogue.CATALOGUE`).
        profiles: the profiles (default: the packaged ones).
        target: the model the user asked for (a reference, or already
            resolved); None = the profile's suggestions, then those of the
            smaller tiers (:func:`suggested_targets`), first that fits.
        profile: ``auto`` (match the device), a profile name or a profile file's path (``.yaml``).
        target_loaded: the target's weights are already in memory (webui), so
            ``device.free_bytes`` must hold only the draft, caches and activations.
        has_medusa_heads: Medusa heads were given for the target.
        available: quantization kinds whose backends are installed.
    Returns:
        The first selection that fits; if none does, the smallest one
        tried, with ``fits=False``.
    """
    profiles = load_profiles() if profiles is None else profiles
    chosen = match_profile(device, profiles) if profile == AUTO else find_profile(profile, profiles)
    dtype = compute_dtype(device, chosen)
    search = _Search(chosen, device, catalogue, frozenset(available), target_loaded, dtype)
    if not search.known_memory:
        search.reasons.append("device memory unknown: the first configuration is taken without a memory check")
    if chosen.dtype == AUTO and device.backend == "cpu" and dtype == "float32":
        search.reasons.append(
            "dtype float32: this CPU has no bfloat16 instructions (avx512_bf16 or AMX), "
            "without which bfloat16 runs slower than float32 on prompts and wide verify steps"
        )
    for tgt in _targets_to_try(target, chosen, profiles, device.backend, catalogue):
        found = _fit_target(search, tgt, has_medusa_heads)
        if found is not None:
            return found
    return _smallest_tried(search)


@dataclass
class _Search:
    """One run of :func:`select`: its fixed inputs, the reasons given so far and the smallest estimate tried."""

    profile: Profile
    device: DeviceInfo
    catalogue: Mapping[str, cat.ModelSpec]
    available: frozenset[str]
    target_loaded: bool
    dtype: str
    reasons: list[str] = field(default_factory=list)
    smallest: Selection | None = None

    @property
    def budget(self) -> int:
        return self.device.available_bytes

    @property
    def known_memory(self) -> bool:
        return self.budget > 0

    def fits(self, total: int) -> bool:
        """Whether an estimate fits the budget (anything does when the memory is unknown)."""
        return not self.known_memory or total <= self.budget

    def padded(self, estimate: int) -> int:
        """An estimate plus the profile's margin, and its reserve unless the target is already loaded."""
        return padded(estimate, self.profile, reserve=not self.target_loaded)

    def estimate(
        self, spec: cat.ModelSpec, kind: str, verify_rows: int, weights_loaded: bool = False
    ) -> cat.MemoryEstimate:
        return cat.estimate_memory(
            spec, kind, self.profile.context_length, _DTYPE_BITS[self.dtype], verify_rows, weights_loaded=weights_loaded
        )

    def kinds(self, model: cat.ResolvedModel, role: str) -> list[str]:
        """The profile's quantizations of ``role`` (target or draft) that ``model`` can be loaded as."""
        preferred = self.profile.quantization.target if role == "target" else self.profile.quantization.draft
        return _kinds(model, preferred, self.dtype, self.available, self.reasons, role)

    def selection(
        self,
        tgt: cat.ResolvedModel,
        method: str,
        t_kind: str,
        total: int,
        parts: Mapping[str, int],
        draft: cat.ModelSpec | None = None,
        d_kind: str | None = None,
        fits: bool = True,
    ) -> Selection:
        """The :class:`Selection` of these choices, with the reasons given so far."""
        chosen = self.profile
        run_dtype = torch_dtype_name(t_kind, self.dtype) if t_kind in FLOAT_KINDS else self.dtype
        return Selection(
            profile=chosen.name,
            device=self.device,
            target=tgt.spec.name if tgt.spec is not None and tgt.is_short_name else tgt.ref,
            target_ref=tgt.reference(t_kind) if t_kind != "loaded" else tgt.ref,
            draft=draft.name if draft else None,
            draft_ref=draft.reference(d_kind) if draft and d_kind else None,
            method=method,
            target_quantization=t_kind,
            draft_quantization=d_kind if draft else None,
            dtype=run_dtype,
            num_speculative_tokens=chosen.num_speculative_tokens if method == "draft" else None,
            lookahead=chosen.lookahead,
            medusa_tree_size=chosen.medusa.tree_size,
            context_length=chosen.context_length,
            estimated_bytes=total,
            budget_bytes=self.budget,
            fits=fits,
            reasons=tuple(dict.fromkeys(self.reasons)),
            breakdown=dict(parts),
        )

    def keep_if_smallest(
        self, tgt: cat.ResolvedModel, method: str, t_kind: str, total: int, parts: Mapping[str, int]
    ) -> None:
        """Remember a selection that does not fit, if it is the smallest so far (the answer when nothing fits)."""
        if self.smallest is None or total < self.smallest.estimated_bytes:
            self.smallest = self.selection(tgt, method, t_kind, total, parts, fits=False)


def _targets_to_try(
    target: str | cat.ResolvedModel | None,
    chosen: Profile,
    profiles: Sequence[Profile],
    backend: str,
    catalogue: Mapping[str, cat.ModelSpec],
) -> list[cat.ResolvedModel]:
    """The user's target, else the suggestions of the profile and of the smaller tiers."""
    if target is None:
        return [cat.resolve(name, catalogue) for name in suggested_targets(chosen, profiles, backend)]
    return [target if isinstance(target, cat.ResolvedModel) else cat.resolve(target, catalogue, user=True)]


def _verify_rows(method: str, profile: Profile) -> int:
    """Rows of one verify forward of ``method``, for the activation estimate."""
    return {
        "lookahead": profile.lookahead.verify_tokens,
        "medusa": profile.medusa.tree_size,
        "draft": (profile.num_speculative_tokens or 8) + 1,
        "prompt_lookup": 11,
    }.get(method, 1)


def _fit_target(search: _Search, tgt: cat.ResolvedModel, has_medusa_heads: bool) -> Selection | None:
    """The first of the profile's methods (then quantizations, then drafts) with which ``tgt`` fits."""
    if tgt.spec is None:
        return _uncatalogued(search, tgt)
    t_kinds = ["loaded"] if search.target_loaded else search.kinds(tgt, "target")
    if not t_kinds:
        search.reasons.append(f"target {tgt.ref}: no quantization of the profile is usable")
        return None
    too_big: set[str] = set()  # target quantizations that do not fit even alone
    for method in search.profile.methods:
        if method == "medusa" and not has_medusa_heads:
            search.reasons.append("medusa: no Medusa heads given for the target")
            continue
        found = _fit_method(search, tgt, method, [k for k in t_kinds if k not in too_big], too_big)
        if found is not None:
            return found
    return None


def _uncatalogued(search: _Search, tgt: cat.ResolvedModel) -> Selection:
    """A target the catalogue does not know: no estimate, no draft, the profile's first method without one."""
    search.reasons.append(f"target {tgt.ref} is not in the catalogue: memory not estimated, no draft chosen")
    kind = tgt.fixed_kind or _FLOAT_OF_DTYPE[search.dtype]
    method = next((m for m in search.profile.methods if m in ("lookahead", "prompt_lookup", "none")), "none")
    return search.selection(
        tgt, method, "loaded" if search.target_loaded else kind, 0, {}, fits=not search.known_memory
    )


def _fit_method(
    search: _Search, tgt: cat.ResolvedModel, method: str, t_kinds: Sequence[str], too_big: set[str]
) -> Selection | None:
    """The first target quantization with which ``method`` fits (for ``draft``: with a draft that fits too);
    quantizations too big for the target alone join ``too_big``."""
    rows = _verify_rows(method, search.profile)
    for t_kind in t_kinds:
        t_est = search.estimate(
            tgt.spec, "bf16" if t_kind == "loaded" else t_kind, rows, weights_loaded=search.target_loaded
        )
        t_total = search.padded(t_est.total)
        parts = {
            "target_weights": t_est.weights,
            "target_kv_cache": t_est.kv_cache,
            "target_activations": t_est.activations,
        }
        if not search.fits(t_total):
            too_big.add(t_kind)
            search.reasons.append(
                f"target {tgt.ref} as {t_kind}: needs {format_bytes(t_total)}, {format_bytes(search.budget)} available"
            )
            search.keep_if_smallest(tgt, method, t_kind, t_total, parts)
            continue
        if method != "draft":
            return search.selection(tgt, method, t_kind, t_total, parts)
        drafts = cat.drafts_for(tgt.spec, search.catalogue)
        if not drafts:
            search.reasons.append(f"draft: no model in the catalogue shares the tokenizer of {tgt.ref} and is smaller")
            return None
        found = _fit_draft(search, tgt, t_kind, t_est, parts, rows, drafts)
        if found is not None:
            return found
    return None


def _fit_draft(
    search: _Search,
    tgt: cat.ResolvedModel,
    t_kind: str,
    t_est: cat.MemoryEstimate,
    parts: Mapping[str, int],
    rows: int,
    drafts: Sequence[cat.ModelSpec],
) -> Selection | None:
    """The first draft (larger first) and draft quantization that fit beside the target as ``t_kind``."""
    for draft in drafts:
        if draft.family != tgt.spec.family:
            search.reasons.append(f"draft {draft.name}: tokenizer family {draft.family}, not {tgt.spec.family}")
            continue
        d_model = cat.ResolvedModel(draft.name, draft, is_short_name=True)
        for d_kind in search.kinds(d_model, "draft"):
            d_est = search.estimate(draft, d_kind, rows)
            total = search.padded(t_est.total + d_est.total)
            if not search.fits(total):
                search.reasons.append(
                    f"target {tgt.ref} as {t_kind} + draft {draft.name} as {d_kind}: needs "
                    f"{format_bytes(total)}, {format_bytes(search.budget)} available"
                )
                continue
            with_draft = {
                **parts,
                "draft_weights": d_est.weights,
                "draft_kv_cache": d_est.kv_cache,
                "draft_activations": d_est.activations,
            }
            return search.selection(tgt, "draft", t_kind, total, with_draft, draft, d_kind)
    return None


def _smallest_tried(search: _Search) -> Selection:
    """When nothing fits: the smallest selection tried (``fits=False``), saying what to install first."""
    if search.smallest is None:
        raise SpecdecError(
            "no configuration could be chosen: " + "; ".join(search.reasons[-3:]),
            "name another target, or choose a profile with --profile",
        )
    missing = _missing_extras(search.reasons)
    first = (
        [
            f"nothing fits with what is installed: install {' and '.join(missing)} first "
            "(quantized weights need a fraction of the memory)"
        ]
        if missing
        else []
    )
    search.reasons.append("nothing fits: this is the smallest configuration tried")
    return replace(search.smallest, reasons=tuple(dict.fromkeys(first + search.reasons)))


# ---------------------------------------------------------------------- front ends
@dataclass
class LoadArguments:
    """Arguments for :func:`specdec.loading.load_model`/``load`` that a profile filled in from its
    :class:`Selection`; ``options`` are the chosen method's."""

    selection: Selection
    target: str
    method: str
    draft: str | None
    dtype: str
    num_speculative_tokens: int | None
    options: MethodOptions
    target_quantization: str | None
    draft_quantization: str | None
    notes: list[str] = field(default_factory=list)

    def quantization_configs(self) -> tuple[Any, Any]:
        """``quantization_config`` for target and draft; a missing backend falls back (noted in ``notes``)."""
        from .devices import resolve_dtype
        from .quantization import build_quantization_config

        configs = []
        for kind in (self.target_quantization, self.draft_quantization):
            if kind is None:
                configs.append(None)
                continue
            choice = build_quantization_config(kind, resolve_dtype(self.dtype), fallback=True)
            if choice.note:
                self.notes.append(choice.note)
            configs.append(choice.config)
        return configs[0], configs[1]


def _local_config(ref: str) -> dict[str, Any] | None:
    path = Path(ref).expanduser()
    try:
        if (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def configure(
    profile: str = AUTO,
    target: str | None = None,
    *,
    device: DeviceInfo | None = None,
    target_loaded: bool = False,
    has_medusa_heads: bool = False,
) -> Selection:
    """Detect the device (unless given) and :func:`select` with the packaged profiles and catalogue.

    The entry point for front ends (``detect``, ``generate``, ``bench``, the webui).
    """
    from .hardware import detect
    from .quantization import available_kinds

    device = device or detect()
    resolved = None
    if target is not None:
        resolved = cat.resolve(target, cat.CATALOGUE, config=_local_config(target), user=True)
    return select(
        device,
        cat.CATALOGUE,
        load_profiles(),
        resolved,
        profile=profile,
        target_loaded=target_loaded,
        has_medusa_heads=has_medusa_heads,
        available=available_kinds(),
    )


def profile_options(method: str, selection: Selection, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``method``'s keyword options: ``given``, plus the profile's values for those not given.

    A profile sets lookahead's ``window_size``/``ngram_size``/``guess_size`` and
    Medusa's ``tree_size`` (unless a ``tree`` is given: the most Medusa tree
    nodes this hardware verifies well); other methods take only what was given.
    """
    filled = {k: v for k, v in (given or {}).items() if v is not None}
    if method == "lookahead":
        for name in ("window_size", "ngram_size", "guess_size"):
            filled.setdefault(name, getattr(selection.lookahead, name))
    elif method == "medusa" and "tree" not in filled:
        filled.setdefault("tree_size", selection.medusa_tree_size)
    return filled


def profile_settings(
    profile: str,
    target: str,
    *,
    method: str = AUTO,
    draft: str | None = None,
    dtype: str = AUTO,
    num_speculative_tokens: int | None = None,
    options: MethodOptions | Mapping[str, Any] | None = None,
    device: DeviceInfo | str | None = None,
    target_loaded: bool = False,
    has_medusa_heads: bool | None = None,
) -> LoadArguments:
    """What ``specdec.load(..., profile=profile)`` loads: the profile fills only what was not given.

    "Not given" means: ``method="auto"``, ``draft=None``, ``dtype="auto"``,
    ``num_speculative_tokens=None``, and the chosen method's options absent or
    None (:func:`profile_options`; ``options`` may also be a method's options
    object, which is taken as it is and names the method). A draft given
    explicitly is loaded unquantized unless the profile chose the same draft.
    ``has_medusa_heads``: whether Medusa heads are at hand (None = whether
    ``options`` carry ``medusa_heads``), e.g. for the bench's medusa row.
    """
    given = dict(options) if isinstance(options, Mapping) else {}
    options_object = None if options is None or isinstance(options, Mapping) else options
    if options_object is not None and method == AUTO:
        method = method_of(options_object)
    if isinstance(device, str):
        from .hardware import detect_for

        device = detect_for(device)
    heads = options_object.medusa_heads if isinstance(options_object, MedusaOptions) else given.get("medusa_heads")
    selection = configure(
        profile,
        target,
        device=device,
        target_loaded=target_loaded,
        has_medusa_heads=heads is not None if has_medusa_heads is None else has_medusa_heads,
    )
    chosen_method = method if method != AUTO else selection.method
    if method == AUTO and draft is not None and selection.method != "draft":
        chosen_method = "draft"  # the user gave a draft: use it
    chosen_draft = draft if draft is not None else (selection.draft_ref if chosen_method == "draft" else None)
    draft_kind = (
        selection.draft_quantization if chosen_draft is not None and chosen_draft == selection.draft_ref else None
    )
    notes = [
        f"profile {selection.profile}: {chosen_method}"
        + (f" (the profile's choice: {selection.method})" if chosen_method != selection.method else "")
        + (f" with draft {chosen_draft}" if chosen_method == "draft" and chosen_draft else "")
        + (f" ({draft_kind})" if chosen_method == "draft" and draft_kind else "")
        + f", target {selection.target_ref} ({selection.target_quantization}), "
        + (
            f"estimate {format_bytes(selection.estimated_bytes)} of {format_bytes(selection.budget_bytes)}"
            if selection.estimated
            else "memory not estimated"
        )
    ]
    if selection.estimated and not selection.fits:
        notes.append("the estimate exceeds the available memory; loading may fail")
    if chosen_method == "draft" and chosen_draft is None:
        notes.append("method draft was asked for but the profile found no draft that fits")
    if options_object is None:
        try:
            options_object = method_options(chosen_method, profile_options(chosen_method, selection, given))
        except SpecdecError as e:
            if method != AUTO:
                raise
            raise SpecdecError(
                f"{e.message} (the method profile {selection.profile} chose)",
                f"name the method of these options (--method), or drop them; {e.hint}",
            ) from None
    target_kind = (
        None if selection.target_quantization in ("loaded", *FLOAT_KINDS, "gguf") else selection.target_quantization
    )
    if target_loaded:
        target_kind = None
    return LoadArguments(
        selection=selection,
        target=selection.target_ref if not target_loaded else target,
        method=chosen_method,
        draft=chosen_draft,
        dtype=dtype if dtype != AUTO else selection.dtype,
        num_speculative_tokens=num_speculative_tokens
        if num_speculative_tokens is not None
        else selection.num_speculative_tokens,
        options=options_object,
        target_quantization=target_kind,
        draft_quantization=None if draft_kind in (None, *FLOAT_KINDS, "gguf") else draft_kind,
        notes=notes,
    )


def _to_pull(ref: str | None) -> str:
    """``"  (not pulled yet: ~N MB on first use)"`` for a packaged model not in the cache, else ``""``."""
    from . import models

    if ref not in models.PACKAGED or models.is_pulled(ref):
        return ""
    return f"  (not pulled yet: ~{models.packaged(ref).size_mb} MB downloaded on first use)"


def describe(config: Selection) -> list[str]:
    """Human-readable lines for ``detect``."""
    d = config.device
    lines = [
        f"device:       {d.backend} {d.name}, {format_bytes(d.total_bytes)} total, {format_bytes(d.free_bytes)} free"
        + (f", compute capability {d.compute_capability[0]}.{d.compute_capability[1]}" if d.compute_capability else "")
        + f" (via {d.source})",
        f"profile:      {config.profile}",
        f"target:       {config.target_ref} ({config.target_quantization}){_to_pull(config.target_ref)}",
        f"draft:        {config.draft_ref} ({config.draft_quantization}){_to_pull(config.draft_ref)}"
        if config.draft_ref
        else "draft:        none",
        f"method:       {config.method}"
        + (f", num_speculative_tokens {config.num_speculative_tokens}" if config.method == "draft" else "")
        + (
            f", W={config.lookahead.window_size} N={config.lookahead.ngram_size} G={config.lookahead.guess_size}"
            if config.method == "lookahead"
            else ""
        ),
        f"dtype:        {config.dtype}, context {config.context_length} tokens",
        f"estimate:     {format_bytes(config.estimated_bytes)} of {format_bytes(config.budget_bytes)} available"
        + ("" if config.fits else "  (DOES NOT FIT)")
        if config.estimated
        else f"estimate:     none (the target is not in the catalogue); {format_bytes(config.budget_bytes)} available",
    ]
    if config.reasons:
        lines.append("fallbacks:")
        lines.extend(f"  - {r}" for r in config.reasons)
    return lines


__all__ = [
    "Profile",
    "ProfileError",
    "Problem",
    "Selection",
    "LoadArguments",
    "parse_profile",
    "load_profiles",
    "load_profile_file",
    "profiles_dir",
    "match_profile",
    "find_profile",
    "select",
    "configure",
    "profile_options",
    "profile_settings",
    "describe",
    "BACKENDS",
]
