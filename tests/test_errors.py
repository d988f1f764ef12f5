"""Bad input gets a clear error that says what is wrong and what to do."""

from __future__ import annotations

import pytest

import specdec
from conftest import tiny_model
from specdec.errors import (
    ContextLengthError,
    InvalidSamplingError,
    ModelNotFoundError,
    SpecdecError,
    UnknownMethodError,
    VocabularyMismatchError,
)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0, max_positions=64)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=0.5, top_p=0.0), "top_p"),
        (dict(temperature=0.5, top_k=-3), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_invalid_sampling_values(target, kwargs, fragment):
    gen = specdec.SpeculativeGenerator(target, method="none")
    with pytest.raises(InvalidSamplingError, match=fragment):
        gen.generate([1, 2, 3], max_new_tokens=4, **kwargs)


def test_prompt_longer_than_context(target):
    gen = specdec.SpeculativeGenerator(target, method="none")
    with pytest.raises(ContextLengthError) as e:
        gen.generate(list(range(1, 60)), max_new_tokens=10)
    assert "context of 64" in str(e.value) and "at most 5" in str(e.value)


def test_unknown_method(target):
    with pytest.raises(UnknownMethodError, match="choose one of"):
        specdec.SpeculativeGenerator(target, method="telepathy")


def test_draft_method_without_draft(target):
    with pytest.raises(SpecdecError, match="needs a draft model"):
        specdec.SpeculativeGenerator(target, method="draft")


def test_draft_with_another_vocabulary(target):
    other = tiny_model("llama", seed=1, vocab=4000)
    with pytest.raises(VocabularyMismatchError) as e:
        specdec.SpeculativeGenerator(target, method="draft", draft=other)
    assert "prompt_lookup" in str(e.value)


def test_text_prompt_without_tokenizer(target):
    with pytest.raises(SpecdecError, match="needs a tokenizer"):
        specdec.SpeculativeGenerator(target, method="none").generate("hello")


def test_unknown_packaged_name_and_missing_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="packaged models"):
        specdec.load("smollm-does-not-exist")
    with pytest.raises(ModelNotFoundError, match="not found"):
        specdec.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        specdec.load(str(tmp_path))


def test_unreadable_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecdecError, match="could not load model"):
        specdec.load(str(tmp_path))


def test_hub_id_without_network():
    with pytest.raises(ModelNotFoundError, match="cannot be reached|could not load"):
        specdec.load("specdec-test/no-such-model-anywhere")


@pytest.mark.real_model
def test_draft_with_other_tokenizer_is_refused(smollm2, tmp_path):
    """Same vocabulary size, different tokens: refused, with prompt lookup suggested."""
    model, tok = smollm2
    from tokenizers import Tokenizer, models as tmodels
    from transformers import PreTrainedTokenizerFast

    vocab = {f"tok{i}": i for i in range(len(tok))}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel(vocab, unk_token="tok0")))
    with pytest.raises(VocabularyMismatchError, match="prompt_lookup"):
        specdec.SpeculativeGenerator(model, tok, method="draft", draft=model, draft_tokenizer=other)
    # the same tokenizer passes
    specdec.SpeculativeGenerator(model, tok, method="draft", draft=model, draft_tokenizer=tok)


@pytest.mark.parametrize("device,fragment", [("foo", "unknown device"), ("cuda:99", "cuda:99"), ("mps", "mps")])
def test_a_device_this_torch_cannot_use(device, fragment):
    """A device name torch does not know, or one this machine lacks, is refused before any model loads."""
    from specdec.devices import resolve_device

    if device == "mps" and resolve_device("auto").type == "mps":
        pytest.skip("this machine has MPS")
    with pytest.raises(SpecdecError, match=fragment) as info:
        resolve_device(device)
    assert "--device" in info.value.hint or "use auto" in info.value.hint


def test_the_cli_says_which_device_is_missing():
    from click.testing import CliRunner

    from specdec.cli import main

    result = CliRunner().invoke(main, ["generate", "hi", "--device", "cuda:99", "-n", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cuda:99" in result.output and "hint" in result.output


def test_a_draft_whose_embedding_lacks_some_of_the_targets_tokens(tmp_path):
    """Same tokenizer, but the draft's embedding stops short of the target's ids: refused at load, not an
    index error in the middle of a reply."""
    import shutil

    from conftest import tiny_model_folder

    target = tiny_model_folder(tmp_path / "target", tiny_model("llama", seed=0, vocab=96))
    draft = tmp_path / "draft"
    tiny_model("llama", seed=1, vocab=48).save_pretrained(draft)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(target / name, draft / name)
    with pytest.raises(VocabularyMismatchError, match="embedding has 48 rows") as info:
        specdec.load(str(target), draft=str(draft), method="draft", dtype="float32", device="cpu")
    assert "prompt_lookup" in info.value.hint


@pytest.mark.parametrize(
    "prompt,fragment",
    [
        (123, "got int"),
        (None, "got NoneType"),
        ([{"content": "hi"}], "chat message 0"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": None}], "chat message 0"),
        ([True, False], "token ids"),
        (b"hello", "bytes"),
        (bytearray(b"hi"), "bytes"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "specdec takes text"),
        ([[1, 2], [3, 4]], "one prompt at most"),
    ],
)
def test_a_prompt_of_the_wrong_shape(tmp_path, prompt, fragment):
    from transformers import AutoTokenizer

    from conftest import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny")
    gen = specdec.SpeculativeGenerator(tiny_model("llama"), AutoTokenizer.from_pretrained(folder), method="none")
    with pytest.raises(SpecdecError, match=fragment):
        gen.generate(prompt, max_new_tokens=2)


def test_token_ids_as_a_tensor_or_a_numpy_array():
    import numpy as np
    import torch

    gen = specdec.SpeculativeGenerator(tiny_model("llama"), method="none")
    ids = [5, 9, 11]
    reference = gen.generate(ids, max_new_tokens=4).token_ids
    for prompt in (torch.tensor(ids), np.array(ids), torch.tensor([ids]), np.array([ids]), {"input_ids": [ids]}):
        assert gen.generate(prompt, max_new_tokens=4).token_ids == reference


def test_a_tokenizers_output_and_text_parts_are_prompts_too(tmp_path):
    """``tokenizer(text, return_tensors="pt")`` (a BatchEncoding of ``[1, L]`` tensors) and chat content given as
    text parts (OpenAI's form), which a chat template that expects a string cannot render itself."""
    from transformers import AutoTokenizer

    from conftest import tiny_model_folder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder(tmp_path / "tiny"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
    gen = specdec.SpeculativeGenerator(tiny_model("llama"), tokenizer, method="none")
    text = "t5 t9 t11"
    reference = gen.generate(text, max_new_tokens=4).token_ids
    assert gen.generate(tokenizer(text, return_tensors="pt"), max_new_tokens=4).token_ids == reference
    assert gen.generate(tokenizer(text), max_new_tokens=4).token_ids == reference
    parts = [{"role": "user", "content": [{"type": "text", "text": "t5"}, {"type": "text", "text": "t9"}]}]
    assert gen.encode(parts) == gen.encode([{"role": "user", "content": "t5\nt9"}])


def test_eos_given_as_text_names_the_way_to_its_id():
    gen = specdec.SpeculativeGenerator(tiny_model("llama"), method="none")
    with pytest.raises(SpecdecError, match="convert_tokens_to_ids") as info:
        gen.generate([5, 9], max_new_tokens=2, eos_token_id="</s>")
    assert "'</s>'" in str(info.value)


def test_a_model_folder_without_tokenizer_files_says_so(tmp_path):
    folder = tmp_path / "weights-only"
    tiny_model("llama").save_pretrained(folder)
    with pytest.raises(ModelNotFoundError, match="no tokenizer files") as info:
        specdec.load(str(folder), method="none", dtype="float32", device="cpu")
    assert "tokenizer.json" in info.value.hint


@pytest.mark.parametrize("threads", [0, -1, 2.5, "2"])
def test_threads_must_be_a_positive_whole_number(threads):
    with pytest.raises(SpecdecError, match="threads"):
        specdec.load("no-such-model", threads=threads)


@pytest.mark.parametrize("method", ["none", "lookahead", "medusa"])
def test_a_draft_length_for_a_method_that_has_none(method):
    """-k with a method that does not use it is refused before any model loads, like another method's options."""
    with pytest.raises(SpecdecError, match="num_speculative_tokens") as info:
        specdec.load("no-such-model", method=method, num_speculative_tokens=3)
    assert "-k" in info.value.hint


def test_lookahead_sizes_beyond_any_step_are_refused():
    from specdec import static
    from specdec.proposers.options import LOOKAHEAD_MAX_ROWS, LookaheadOptions

    assert LOOKAHEAD_MAX_ROWS == max(static.BUCKETS)  # the bound is the static path's widest bucket
    LookaheadOptions(window_size=15, ngram_size=5, guess_size=15)  # the widest profile
    with pytest.raises(SpecdecError, match="rows"):
        LookaheadOptions(window_size=100, ngram_size=50, guess_size=100)
    with pytest.raises(SpecdecError, match="rows"):
        LookaheadOptions(ngram_size=9999)


def test_more_threads_than_cores_is_warned(caplog):
    import os

    import torch

    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="specdec"), pytest.raises(SpecdecError):
            specdec.load("no-such-model", threads=(os.cpu_count() or 1) + 1)  # warned, then the model is missing
    finally:
        torch.set_num_threads(before)
    assert any("threads" in r.getMessage() and "cores" in r.getMessage() for r in caplog.records)


@pytest.mark.real_model
def test_a_chat_that_ends_with_the_assistants_words_continues_them(smollm2):
    """A chat UI's "continue": the last message is the assistant's, cut short; the reply goes on with it instead
    of closing it and opening a new assistant turn."""
    from conftest import hf_greedy

    model, tokenizer = smollm2
    gen = specdec.SpeculativeGenerator(model, tokenizer, method="prompt_lookup")
    opened = "Three rivers of Europe are the Danube,"
    chat = [{"role": "user", "content": "Name three rivers of Europe."}, {"role": "assistant", "content": opened}]
    ids = gen.encode(chat)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + opened)
    reply = gen.generate(chat, max_new_tokens=12)
    assert reply.token_ids == hf_greedy(model, ids, 12)
    asked = gen.encode(chat[:1])  # a chat that ends with the user's message still opens the assistant's turn
    assert tokenizer.decode(asked).endswith("<|im_start|>assistant\n")


def test_content_that_is_not_text_is_named_by_message_and_part():
    """The engine and the server read chat content with one function: the error carries the message's and the
    part's index, which the server's 400 names as its ``param``."""
    from specdec.engine import message_text
    from specdec.errors import ChatContentError

    image = {"type": "image_url", "image_url": {"url": "x"}}
    with pytest.raises(ChatContentError, match="chat message 3, content part 1, is of type 'image_url'") as info:
        message_text([{"type": "text", "text": "look"}, image], 3)
    assert (info.value.index, info.value.part) == (3, 1)
    with pytest.raises(ChatContentError) as info:
        message_text(42, 0)
    assert info.value.part is None
    pytest.importorskip("pydantic")
    from specdec.server.schemas import ApiError, ChatRequest

    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "a"}, image]}]
    request = ChatRequest(model="m", messages=messages)
    with pytest.raises(ApiError) as info:
        request.chat_messages()
    assert info.value.param == "messages[1].content[1].type" and "image_url" in info.value.message


def test_an_assistant_message_with_tool_calls_is_refused_not_dropped():
    """specdec calls no tools; a history holding an assistant's tool calls would render as an empty turn."""
    pytest.importorskip("pydantic")
    from specdec.server.schemas import ApiError, ChatRequest

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for field, value in (("tool_calls", [call]), ("function_call", call["function"])):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, field: value}]
        with pytest.raises(ApiError) as info:
            ChatRequest(model="m", messages=messages).chat_messages()
        assert info.value.param == f"messages[1].{field}" and "tools" in info.value.message
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "tool_calls": []}]
    assert ChatRequest(model="m", messages=empty).chat_messages()[1] == {"role": "assistant", "content": "ok"}
