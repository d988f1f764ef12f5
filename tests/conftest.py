"""Shared fixtures: tiny random models built in-process, the packaged real model, and the server's app served
in-process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

DEVICE = torch.device("cpu")
"""Where :func:`tiny_model` puts its models: ``python -m pytest --device cuda`` runs the decoding tests on a GPU."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the tiny random models (cpu, cuda, cuda:1, mps); tests that need the "
        "CPU (quantization, real models) keep it",
    )


def pytest_configure(config: pytest.Config) -> None:
    global DEVICE
    DEVICE = torch.device(config.getoption("--device"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one torch thread, and threads stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    vocab: int = 96,
    sharpness: float = 1.0,
    attn: str = "sdpa",
    max_positions: int = 512,
    eos: int | None = None,
    tied: bool = False,
    *,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    init: float = 0.02,
    bos: int | None = None,
    pad: int | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """A tiny random causal LM (``layers`` layers, 4 heads, 2 KV heads) in fp32 on ``device`` (default
    :data:`DEVICE`), built after ``torch.manual_seed(seed)``. ``sharpness`` scales the lm_head so the
    output distributions are peaked (random models are otherwise near uniform), as does a larger ``init``
    (the initializer range); ``tied``: the lm_head shares the input embeddings' weight. ``bos``, ``eos``
    and ``pad`` are the special token ids of the config, and ``eos`` and ``pad`` those of the generation
    config too."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=init,
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=pad,
        tie_word_embeddings=tied,
    )
    config._attn_implementation = attn
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    if sharpness != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpness)
    return model.to(DEVICE if device is None else device)


def tiny_model_folder(folder: Path, model: torch.nn.Module | None = None) -> Path:
    """``model`` (default: a tiny Llama, :func:`tiny_model`) saved in ``folder`` with a word-level tokenizer
    (``t0``, ``t1``... up to its vocabulary, split on whitespace, no chat template), loadable by path like any
    local model."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama") if model is None else model
    model.save_pretrained(folder)
    vocab = model.config.vocab_size
    tok = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)
    return folder


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """transformers' own greedy decoding: the reference every method must reproduce."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **kwargs
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (fp32) and its tokenizer; skipped when the model was not pulled."""
    from specdec import models
    from specdec.loading import load_model

    if not models.is_pulled("smollm2-135m"):
        pytest.skip("smollm2-135m is not pulled: run `specdec-local models pull smollm2-135m`")
    return load_model("smollm2-135m", dtype="float32", device="cpu")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_served(app) -> Iterator[int]:
    """The server's ASGI ``app`` served by uvicorn in a thread on 127.0.0.1 (its lifespan run: the worker
    starts); yields the port, and stops the server when the block ends."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
