"""FewRowLinear: float32 CPU linears whose few-row products take the fast form, and the same tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import hf_greedy, tiny_model, tiny_model_folder
from torch import nn

import specdec
from specdec.linear import FEW_ROWS, FewRowLinear, use_few_row_linears
from specdec.loading import load_model


def _stock(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with plain ``nn.Linear`` layers again (transformers' own computation)."""
    stock = copy.deepcopy(model)
    for module in stock.modules():
        if isinstance(module, FewRowLinear):
            module.__class__ = nn.Linear
    return stock


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5, FEW_ROWS, FEW_ROWS + 1, 100])
def test_few_row_linear_computes_nn_linear(rows, bias):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias)
    few = copy.deepcopy(plain)
    few.__class__ = FewRowLinear
    for shape in ((rows, 48), (1, rows, 48)):
        x = torch.randn(*shape)
        got, want = few(x), plain(x)
        assert got.shape == want.shape and got.is_contiguous()
        if rows == 1 or rows > FEW_ROWS:
            assert torch.equal(got, want)  # nn.Linear's own path
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    half = copy.deepcopy(few).to(torch.bfloat16)  # 16-bit floats: nn.Linear's own path
    x = torch.randn(1, 4, 48, dtype=torch.bfloat16)
    assert torch.equal(half(x), copy.deepcopy(plain).to(torch.bfloat16)(x))


def test_only_plain_float32_cpu_linears_are_replaced_and_parameters_are_shared():
    model = tiny_model("llama")
    weights = {name: p for name, p in model.named_parameters()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert use_few_row_linears(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert all(p is weights[name] for name, p in model.named_parameters())  # the same tensors, same names
    assert use_few_row_linears(model) == 0  # already done

    class Quantized(nn.Linear):  # a subclass (bitsandbytes' layers are): left alone
        pass

    other = nn.Sequential(Quantized(4, 4), nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4))
    other[3].register_forward_hook(lambda *a: None)  # wrapped by someone: left alone
    assert use_few_row_linears(other) == 1 and type(other[1]) is FewRowLinear
    assert [type(m) for m in (other[0], other[2], other[3])] == [Quantized, nn.Linear, nn.Linear]


def test_tied_embeddings_stay_tied():
    model = tiny_model("llama", tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    use_few_row_linears(model)
    assert isinstance(model.lm_head, FewRowLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_load_model_uses_them_for_float32_on_a_cpu_only(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    fp32, _ = load_model(str(folder), dtype="float32", device="cpu")
    bf16, _ = load_model(str(folder), dtype="bfloat16", device="cpu")
    assert isinstance(fp32.lm_head, FewRowLinear) and type(bf16.lm_head) is nn.Linear


@pytest.mark.parametrize("method", ["prompt_lookup", "lookahead", "draft"])
def test_greedy_tokens_equal_transformers_with_its_own_linears(method):
    """Verify steps of several rows through FewRowLinear; the reference decodes with stock nn.Linear."""
    target = tiny_model("llama", seed=1, sharpness=4.0)
    stock = _stock(target)
    use_few_row_linears(target)
    draft = tiny_model("llama", seed=2, sharpness=4.0) if method == "draft" else None
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    gen = specdec.SpeculativeGenerator(target, method=method, draft=draft, num_speculative_tokens=6)
    out = gen.generate(prompt, max_new_tokens=40)
    assert out.token_ids == hf_greedy(stock, prompt, 40)
    assert out.stats.proposed > 0  # verify steps of several rows ran


@pytest.mark.real_model
def test_smollm2_greedy_with_few_row_linears_equals_stock_transformers(smollm2):
    model, tok = smollm2
    assert isinstance(model.lm_head, FewRowLinear)  # as load_model gives it
    stock = _stock(model)
    messages = [{"role": "user", "content": "Rewrite with a loop: def f(x): return x + x + x + x, then explain it."}]
    for method in ("prompt_lookup", "lookahead"):
        gen = specdec.SpeculativeGenerator(model, tok, method=method)
        ids = gen.encode(messages)
        out = gen.generate(ids, max_new_tokens=48)
        assert out.token_ids == hf_greedy(stock, ids, 48), method
        assert out.stats.proposed > 0, method
