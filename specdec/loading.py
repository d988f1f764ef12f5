"""Loading targets and drafts: packaged names, local folders, ``.gguf`` files, hub ids."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import models, unpacked
from .devices import DTYPES, resolve_device, resolve_dtype  # noqa: F401 - part of this module's API
from .errors import ModelNotFoundError, SpecdecError
from .linear import use_few_row_linears
from .proposers import MethodOptions, method_and_options
from .sampling import is_int
from .static import check_compile_steps

log = logging.getLogger(__name__)


def locate(name_or_path: str, pull: bool = True) -> tuple[str, str | None]:
    """Map a model reference to ``(from_pretrained path or id, gguf file name or None)``.

    Packaged names are pulled on first use (when ``pull``).
    """
    ref = str(name_or_path)
    if ref in models.PACKAGED:
        path = models.pull(ref) if pull else models.local_path(ref)
        return str(path.parent), path.name
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}", "check the path")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0].name
            raise ModelNotFoundError(
                f"{path} has no config.json" + (f" and {len(ggufs)} .gguf files" if ggufs else ""),
                "give a transformers model folder or one .gguf file",
            )
        return str(path), None
    if "/" not in ref or ref.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model {ref!r} is neither a packaged name nor an existing path",
            f"packaged models: {', '.join(models.PACKAGED)} (see `specdec-local models list`); "
            "or give a local folder, a .gguf file or a hub id like org/name",
        )
    _check_hub_reachable(ref)
    return ref, None  # a hub id


def _check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail fast (instead of minutes of retries) when a hub id is neither cached nor reachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local cache and the model hub ({host}) cannot be reached",
            f"use a packaged model ({', '.join(models.PACKAGED)}), a local folder or a .gguf file",
        ) from None


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    quantization_config: Any = None,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: packaged name, local folder, ``.gguf`` file or hub id.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
        quantization_config: passed to ``from_pretrained`` (bitsandbytes, GPTQ).

    A ``.gguf`` file loaded without a quantization config is read from its unpacked copy after the first
    load (:mod:`specdec.unpacked`): the same tensors, without parsing the file again.

    A float32 model on the CPU gets :class:`specdec.linear.FewRowLinear` layers: its verify steps of
    2-32 rows then cost far less (4 rows: about 1.1x one row's forward instead of 2x).

    Returns:
        ``(model in eval mode, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    where, gguf_file = locate(name_or_path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    unpacked_copy = (
        unpacked.copy_for(Path(where) / gguf_file, torch_dtype) if gguf_file and not quantization_config else None
    )
    loaded = unpacked.load(unpacked_copy) if unpacked_copy else None
    if gguf_file and not loaded:
        log.warning(
            "reading %s: a .gguf file is parsed and de-quantized on load, the slowest step (measured on a "
            "2-core CPU: 16 s for 135M parameters, 65 s for 1.5B)%s",
            gguf_file,
            "; later loads read the unpacked copy kept of it" if unpacked_copy else "",
        )
    try:
        if loaded:
            model, tokenizer = loaded
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf_file} if gguf_file else {}))
            except Exception:
                if not gguf_file and Path(where).is_dir() and not _has_tokenizer_files(Path(where)):
                    raise ModelNotFoundError(
                        f"could not load model {name_or_path!r}: {where} has no tokenizer files",
                        "copy the tokenizer files (tokenizer.json, tokenizer_config.json...) of the model it "
                        "came from into the folder",
                    ) from None
                raise
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as e:
        is_hub = where == str(name_or_path) and not Path(where).exists()
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r}: {str(e).splitlines()[0]}",
            "no model hub may be reachable from here: use a packaged name (`specdec-local models list`), "
            "a local folder or a .gguf file"
            if is_hub
            else "check that the folder holds a complete transformers model",
        ) from None
    except SpecdecError:
        raise
    except Exception as e:  # a truncated or corrupt file fails deep in a reader (struct.error, SafetensorError...)
        raise unreadable_model(name_or_path, where, gguf_file, e) from None
    if unpacked_copy and not loaded:
        unpacked.store(model, tokenizer, unpacked_copy)
    if gguf_file:  # the model's name is the one the user gave, not the cache folder or unpacked copy it came from
        model.config.name_or_path = model.name_or_path = str(name_or_path)
    if quantization_config is None and model.device != dev:
        model = model.to(dev)
    if model.device.type == "cpu" and model.dtype == torch.float32:
        use_few_row_linears(model)  # verify steps of a few rows at about one row's cost (specdec.linear)
    return model.eval(), tokenizer


K_METHODS = ("draft", "prompt_lookup")
"""The methods whose draft length ``num_speculative_tokens`` fixes."""

TOKENIZER_FILES = ("*token*", "vocab*", "merges.txt", "*.model")
"""Names of tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, spiece.model...)."""


def _has_tokenizer_files(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in TOKENIZER_FILES)


def unreadable_model(name_or_path: str, where: str, gguf_file: str | None, error: Exception) -> SpecdecError:
    """The error for a model whose files exist but cannot be read (truncated, corrupt, unsupported)."""
    detail = (str(error).strip().splitlines() or [""])[0]
    what = Path(where) / gguf_file if gguf_file else Path(where)
    if str(name_or_path) in models.PACKAGED:
        hint = f"download it again with `specdec-local models pull --force {name_or_path}`"
    elif gguf_file:
        hint = f"the file {what} may be truncated or corrupt: download or convert it again"
    else:
        hint = f"check that {what} holds a complete transformers model (its weights may be truncated or corrupt)"
    kind = (
        type(error).__name__
        if type(error).__module__ == "builtins"
        else f"{type(error).__module__}.{type(error).__name__}"
    )
    return ModelNotFoundError(f"could not load model {name_or_path!r}: {kind}: {detail}", hint)


def load(
    target: str | None = None,
    draft: str | None = None,
    method: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    num_speculative_tokens: int | None = None,
    threads: int | None = None,
    profile: str | None = None,
    static_cache: bool | None = None,
    compile_steps: bool = False,
    prefix_cache: bool = True,
    options: MethodOptions | None = None,
    **method_options: Any,
):
    """Load a target (and a draft) and return a ready :class:`~specdec.SpeculativeGenerator`.

    Args:
        target: packaged name, local folder, ``.gguf`` file or hub id (None: ``smollm2-135m``, or with a
            ``profile`` the profile's choice for this machine).
        draft: the same kinds of reference, for method ``draft``/``auto``.
        method: ``none``, ``draft``, ``prompt_lookup``, ``lookahead``, ``medusa`` or ``auto``.
        dtype: ``auto`` (:func:`specdec.devices.resolve_dtype`), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto`` or a torch device string.
        num_speculative_tokens: fixed candidates per step (None = adaptive).
        threads: CPU threads for torch (None = torch's default).
        options: the method's options as an object (:mod:`specdec.proposers.options`).
        **method_options: or the chosen method's options as keywords (``window_size``, ``ngram_size``,
            ``guess_size``, ``medusa_heads`` (a folder or a MedusaHeads), ``tree``...; see
            :class:`~specdec.SpeculativeGenerator`).
        profile: ``"auto"`` or a hardware profile name: detect the device and let the
            profile fill method, draft, quantization, dtype, num_speculative_tokens and
            the chosen method's options that were not given (see :func:`specdec.profiles.profile_settings`);
            the generator then has a ``selection`` attribute saying what the profile chose.
        static_cache: preallocated caches at fixed row buckets, captured as CUDA graphs on
            CUDA (None = on for CUDA, off elsewhere; see :mod:`specdec.static`).
        compile_steps: compile the static steps with ``torch.compile`` before capture (see
            :class:`~specdec.SpeculativeGenerator`).
        prefix_cache: keep the last generation's KV for what the next prompt shares with it (a chat's
            earlier turns); see :class:`~specdec.SpeculativeGenerator`.
    """
    from .engine import SpeculativeGenerator

    if threads is not None:
        if not is_int(threads) or threads < 1:
            raise SpecdecError(f"threads must be a whole number >= 1, got {threads!r}", "or None for torch's default")
        cores = os.cpu_count() or threads
        if threads > cores:
            log.warning(
                "threads=%d on %d cores: torch's threads will wait for each other (use at most %d)",
                threads,
                cores,
                cores,
            )
        torch.set_num_threads(int(threads))
    check_compile_steps(static_cache, compile_steps)  # before loading anything
    target_qc = draft_qc = arguments = None
    asked_k = num_speculative_tokens  # as given (a profile may fill it for the method it chooses)
    if profile is not None:
        from .profiles import profile_settings

        arguments = profile_settings(
            profile,
            target,
            method=method,
            draft=draft,
            dtype=dtype,
            device=device,
            num_speculative_tokens=num_speculative_tokens,
            options=options if options is not None else method_options,
        )
        target, draft, method, dtype = arguments.target, arguments.draft, arguments.method, arguments.dtype
        if options is None:  # the keywords are in arguments.options now (both given: the generator refuses)
            method_options = {}
        num_speculative_tokens, options = arguments.num_speculative_tokens, arguments.options
        target_qc, draft_qc = arguments.quantization_configs()
        log.info("; ".join(arguments.notes))
    else:  # check the method and its options before loading anything (a profile has done so already)
        target = models.DEFAULT_MODEL if target is None else target
        method, options = method_and_options(method, draft, options, method_options)
        method_options = {}
    if draft is not None and method != "draft":  # the method is resolved: a draft it would ignore is a mistake
        raise SpecdecError(
            f"a draft model ({draft}) is only used by method 'draft', and the method is {method!r}",
            "drop the draft (--draft), or use method 'draft' (or 'auto')",
        )
    if asked_k is not None and method not in K_METHODS:  # a setting never goes silently unused
        raise SpecdecError(
            f"num_speculative_tokens (-k) is used by methods {' and '.join(map(repr, K_METHODS))}, "
            f"and the method is {method!r}",
            "drop -k, or choose one of those methods (lookahead sizes its steps with --window-size, "
            "--ngram-size and --guess-size)",
        )
    model, tokenizer = load_model(target, dtype=dtype, device=device, quantization_config=target_qc)
    draft_model = draft_tokenizer = None
    if draft is not None:
        draft_model, draft_tokenizer = load_model(
            draft, dtype=dtype, device=str(model.device), quantization_config=draft_qc
        )
    generator = SpeculativeGenerator(
        model,
        tokenizer,
        method=method,
        draft=draft_model,
        num_speculative_tokens=num_speculative_tokens,
        draft_tokenizer=draft_tokenizer,
        static_cache=static_cache,
        compile_steps=compile_steps,
        prefix_cache=prefix_cache,
        options=options,
        **method_options,
    )
    if arguments is not None:
        generator.selection = arguments.selection
        generator.profile_notes = arguments.notes
    return generator
