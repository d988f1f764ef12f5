"""Method options: one options class per method, built for the chosen method only."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import hf_greedy, tiny_model

import specdec
from specdec.errors import SpecdecError
from specdec.proposers import REGISTRY, method_of, method_options, option_names
from specdec.proposers.options import DraftOptions, LookaheadOptions, MedusaOptions, NoneOptions, PromptLookupOptions

PROMPT = [5, 17, 33, 8, 61, 2, 44, 17, 33, 8, 61, 9, 5, 17]


def test_every_method_has_one_options_class_named_after_it():
    assert {m: e.options for m, e in REGISTRY.items()} == {
        "none": NoneOptions,
        "draft": DraftOptions,
        "prompt_lookup": PromptLookupOptions,
        "lookahead": LookaheadOptions,
        "medusa": MedusaOptions,
    }
    for method, entry in REGISTRY.items():
        assert method_of(entry.options()) == method
        assert entry.options.__name__ == "".join(p.title() for p in method.split("_")) + "Options"


def test_keyword_options_are_built_for_the_chosen_method_only():
    assert method_options("lookahead", {"window_size": 2, "guess_size": None}) == LookaheadOptions(window_size=2)
    assert method_options("none", {"window_size": None, "tree": None}) == NoneOptions()  # None = not given
    with pytest.raises(SpecdecError, match="window_size do not apply to method 'draft'") as err:
        method_options("draft", {"window_size": 4, "max_ngram": 2})
    assert "window_size (lookahead)" in err.value.hint and "max_ngram" in err.value.hint  # own options listed
    with pytest.raises(SpecdecError, match="no method"):
        method_options("prompt_lookup", {"windw_size": 4})
    with pytest.raises(SpecdecError, match="resolve"):
        method_options("auto", {})
    assert "num_speculative_tokens" not in option_names("prompt_lookup")  # set through the generator, not here


@pytest.mark.parametrize(
    "cls,values,match",
    [
        (LookaheadOptions, {"window_size": 0}, "window_size"),
        (LookaheadOptions, {"ngram_size": 2.5}, "ngram_size"),
        (PromptLookupOptions, {"min_ngram": 4, "max_ngram": 3}, "min_ngram"),
        (PromptLookupOptions, {"branches": True}, "branches"),
        (DraftOptions, {"confidence_stop": 1.0}, "confidence_stop"),
        (DraftOptions, {"int8": "yes"}, "int8"),
        (MedusaOptions, {"tree_size": 0}, "tree_size"),
        (MedusaOptions, {"tree": [[0]], "dynamic_tree": True}, "either a fixed tree or dynamic_tree"),
    ],
)
def test_options_are_validated(cls, values, match):
    with pytest.raises(SpecdecError, match=match):
        cls(**values)


def test_an_options_object_is_accepted_and_names_the_method():
    target = tiny_model("llama", seed=0, sharpness=3.0)
    by_keywords = specdec.SpeculativeGenerator(target, method="lookahead", window_size=2, ngram_size=4)
    by_object = specdec.SpeculativeGenerator(target, options=LookaheadOptions(window_size=2, ngram_size=4))
    assert by_object.method == "lookahead" and by_object.options == by_keywords.options
    expected = hf_greedy(target, PROMPT, 24)
    assert by_object.generate(PROMPT, max_new_tokens=24).token_ids == expected
    assert by_keywords.generate(PROMPT, max_new_tokens=24).token_ids == expected
    with pytest.raises(SpecdecError, match="not 'prompt_lookup'"):
        specdec.SpeculativeGenerator(target, method="prompt_lookup", options=LookaheadOptions())
    with pytest.raises(SpecdecError, match="both"):
        specdec.SpeculativeGenerator(target, options=LookaheadOptions(), window_size=3)
    with pytest.raises(SpecdecError, match="do not apply to method 'none'"):
        specdec.SpeculativeGenerator(target, method="none", window_size=3)


def test_auto_builds_the_options_of_the_method_it_resolves_to():
    target = tiny_model("llama", seed=0)
    gen = specdec.SpeculativeGenerator(target, max_ngram=2, window_size=None)  # auto: prompt lookup without a draft
    assert gen.method == "prompt_lookup" and gen.options == PromptLookupOptions(max_ngram=2)
    with pytest.raises(SpecdecError, match="do not apply to method 'prompt_lookup'"):
        specdec.SpeculativeGenerator(target, window_size=2)


def test_the_command_line_names_another_methods_options_as_its_flags():
    from click.testing import CliRunner

    from specdec.cli import main

    res = CliRunner().invoke(main, ["generate", "hi", "-m", "prompt_lookup", "--window-size", "4", "-t", "no-such"])
    assert res.exit_code == 1 and "--window-size is an option of lookahead, and the method is 'prompt_lookup'" in (
        res.output
    )
    assert "use --method lookahead" in res.output and "window_size" not in res.output


def test_load_checks_the_options_before_loading_a_model():
    with pytest.raises(SpecdecError, match="do not apply to method 'none'"):
        specdec.load("no-such-model-here", method="none", window_size=3)
    with pytest.raises(SpecdecError, match="needs a draft model"):
        specdec.load("no-such-model-here", method="draft")
    for method in ("none", "prompt_lookup", "lookahead"):  # a draft they would silently ignore
        for profile in (None, "cpu"):
            with pytest.raises(SpecdecError, match=f"only used by method 'draft', and the method is '{method}'"):
                specdec.load("no-such-model-here", draft="no-such-draft", method=method, profile=profile)


def test_options_are_frozen_and_importable_without_torch():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LookaheadOptions().window_size = 2
    code = "import sys, specdec.proposers, specdec.profiles; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
