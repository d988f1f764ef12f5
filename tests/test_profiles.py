"""Profiles: schema errors, the catalogue, the estimator, selection on fake devices, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from specdec import catalogue as cat
from specdec.cli import main
from specdec.errors import SpecdecError
from specdec.hardware import GIB, DeviceInfo, assumed_gpu
from specdec.profiles import (
    ProfileError,
    describe,
    find_profile,
    load_profile_file,
    load_profiles,
    match_profile,
    parse_profile,
    profile_settings,
    profiles_dir,
    select,
)
from specdec.proposers.options import DraftOptions, LookaheadOptions, NoneOptions
from specdec.quantization import FLOAT_KINDS, KINDS

PROFILES = load_profiles()
LAPTOP_4GB = DeviceInfo("cuda", "GeForce GTX 1650 (laptop)", 4 * GIB, int(3.7 * GIB), (7, 5))
APPLE_16GB = DeviceInfo("mps", "Apple M2", 16 * GIB, int(10.7 * GIB))
CPU_16GB = DeviceInfo("cpu", "CPU", 16 * GIB, 12 * GIB)
ONE_GB_FREE = DeviceInfo("cuda", "RTX 3070 (target loaded)", 8 * GIB, 1 * GIB, (8, 6))

# device -> (profile, target, draft, method, target quantization, draft quantization)
EXPECTED = {
    "4gb laptop": (
        LAPTOP_4GB,
        ("gpu-4gb", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "draft", "nf4", "int8"),
    ),
    "8gb": (
        assumed_gpu(8 * GIB),
        ("gpu-8gb", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "draft", "nf4", "bf16"),
    ),
    "12gb": (
        assumed_gpu(12 * GIB),
        ("gpu-12gb", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "draft", "int8", "bf16"),
    ),
    "16gb": (
        assumed_gpu(16 * GIB),
        ("gpu-16gb", "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "draft", "nf4", "int8"),
    ),
    "24gb": (
        assumed_gpu(24 * GIB),
        ("gpu-24gb", "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "draft", "int8", "bf16"),
    ),
    "apple 16gb": (
        APPLE_16GB,
        ("apple", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "draft", "fp16", "fp16"),
    ),
    "cpu only": (CPU_16GB, ("cpu", "qwen-coder-1.5b", "qwen-coder-0.5b", "draft", "gguf", "gguf")),
}


# ---------------------------------------------------------------------- selection
@pytest.mark.parametrize("name", list(EXPECTED))
def test_fake_devices_get_the_expected_configuration_within_memory(name):
    device, expected = EXPECTED[name]
    config = select(device, cat.CATALOGUE, PROFILES)
    got = (
        config.profile,
        config.target_ref,
        config.draft_ref,
        config.method,
        config.target_quantization,
        config.draft_quantization,
    )
    assert got == expected
    assert config.fits and 0 < config.estimated_bytes <= device.available_bytes
    assert config.estimated_bytes >= sum(config.breakdown.values())  # margin and reserve come on top


def test_a_cpu_without_bfloat16_instructions_runs_float32_and_is_sized_for_it():
    native = select(CPU_16GB, cat.CATALOGUE, PROFILES)
    avx2 = select(DeviceInfo("cpu", "CPU", 16 * GIB, 12 * GIB, cpu_bf16=False), cat.CATALOGUE, PROFILES)
    assert (native.dtype, avx2.dtype) == ("bfloat16", "float32")
    assert any("no bfloat16 instructions" in r for r in avx2.reasons) and not any(
        "bfloat16" in r for r in native.reasons
    )
    assert (avx2.target_ref, avx2.target_quantization) == (native.target_ref, "gguf") and avx2.fits
    assert avx2.breakdown["target_weights"] > 1.9 * native.breakdown["target_weights"]  # de-quantized to 32 bits
    bf16 = profile_settings(
        "auto", "qwen-coder-1.5b", device=DeviceInfo("cpu", "CPU", 16 * GIB, 12 * GIB, cpu_bf16=False), dtype="bfloat16"
    )
    assert bf16.dtype == "bfloat16"  # asked for: kept


def test_one_gb_free_after_the_target_drops_the_draft_and_says_why():
    config = select(ONE_GB_FREE, cat.CATALOGUE, PROFILES, "qwen2.5-7b", target_loaded=True)
    assert config.profile == "gpu-8gb" and config.fits
    assert config.method == "lookahead" and config.draft_ref is None
    assert config.estimated_bytes <= ONE_GB_FREE.free_bytes
    assert config.breakdown["target_weights"] == 0
    tried = [r for r in config.reasons if "draft qwen2.5-0.5b as" in r]
    assert [r.split(" as ")[-1].split(":")[0] for r in tried] == ["bf16", "int8", "nf4"]  # smaller each step


def test_falls_back_to_a_smaller_target_quantization_then_a_smaller_target():
    config = select(assumed_gpu(6 * GIB), cat.CATALOGUE, PROFILES)
    assert any("qwen2.5-7b as nf4: needs" in r for r in config.reasons)
    assert config.target == "qwen2.5-3b" and config.fits


def test_missing_backends_are_skipped_with_the_extra_to_install():
    config = select(assumed_gpu(8 * GIB), cat.CATALOGUE, PROFILES, available=FLOAT_KINDS + ("gguf",))
    assert config.target_quantization in FLOAT_KINDS and config.fits
    assert any("install specdec[bnb]" in r for r in config.reasons)
    assert any("install specdec[gptq]" in r for r in config.reasons)


def test_explicit_hub_id_is_quantized_on_load_not_swapped_for_another_checkpoint():
    config = select(assumed_gpu(8 * GIB), cat.CATALOGUE, PROFILES, "Qwen/Qwen2.5-7B-Instruct")
    assert config.target_ref == "Qwen/Qwen2.5-7B-Instruct" and config.target_quantization == "nf4"


def test_short_name_may_load_the_gptq_variant():
    config = select(assumed_gpu(8 * GIB), cat.CATALOGUE, PROFILES, "qwen2.5-7b", available=("bf16", "gptq"))
    assert config.target_ref == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4" and config.target_quantization == "gptq"


def test_packaged_gguf_target_keeps_its_format():
    config = select(assumed_gpu(8 * GIB), cat.CATALOGUE, PROFILES, "qwen-coder-1.5b")
    assert config.target_quantization == "gguf" and config.target_ref == "qwen-coder-1.5b"
    assert config.draft == "qwen2.5-coder-0.5b"


def test_unknown_target_gets_no_draft():
    config = select(CPU_16GB, cat.CATALOGUE, PROFILES, "someone/unknown-model")
    assert config.method in ("lookahead", "prompt_lookup", "none") and config.draft_ref is None
    assert any("not in the catalogue" in r for r in config.reasons)
    assert any(line.startswith("estimate:     none (the target is not in the catalogue)") for line in describe(config))


def test_target_without_a_smaller_relative_gets_no_draft():
    config = select(CPU_16GB, cat.CATALOGUE, PROFILES, "smollm2-135m")
    assert config.method == "lookahead" and any("shares the tokenizer" in r for r in config.reasons)


def test_a_packaged_name_given_by_the_user_stays_the_packaged_file():
    """``smollm2-135m`` is both the catalogue's short name and the packaged GGUF's name: given as --target, it
    means the file ``models list`` shows, not a hub checkpoint a GPU profile would choose (offline: none)."""
    for device in (ONE_GB_FREE, CPU_16GB, LAPTOP_4GB):
        chosen = select(device, cat.CATALOGUE, PROFILES, "smollm2-135m")
        assert (chosen.target_ref, chosen.target_quantization) == ("smollm2-135m", "gguf"), device
    assert cat.resolve("smollm2-135m").is_short_name  # a profile's target list names catalogue entries


def test_detect_says_which_chosen_models_a_first_use_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MODELS", str(tmp_path))  # an empty model cache
    chosen = select(CPU_16GB, cat.CATALOGUE, PROFILES)
    lines = {line.split(":")[0]: line for line in describe(chosen)}
    assert chosen.target_ref == "qwen-coder-1.5b" and chosen.draft_ref == "qwen-coder-0.5b"
    assert "(not pulled yet: ~1117 MB downloaded on first use)" in lines["target"]
    assert "(not pulled yet: ~491 MB" in lines["draft"]


def test_medusa_is_chosen_only_with_heads():
    assert select(CPU_16GB, cat.CATALOGUE, PROFILES, "smollm2-135m", has_medusa_heads=True).method == "medusa"


def test_unknown_memory_takes_the_first_configuration_and_says_so():
    config = select(DeviceInfo("cpu", "unknown", 0, 0, source="none"), cat.CATALOGUE, PROFILES)
    assert config.profile == "cpu" and config.budget_bytes == 0
    assert "memory unknown" in config.reasons[0]


def test_nothing_fits_returns_the_smallest_with_fits_false():
    config = select(assumed_gpu(1 * GIB), cat.CATALOGUE, PROFILES, "qwen2.5-14b")
    assert not config.fits and "nothing fits" in config.reasons[-1]


def test_profile_by_name_and_unknown_name():
    assert select(CPU_16GB, cat.CATALOGUE, PROFILES, profile="gpu-4gb").profile == "gpu-4gb"
    with pytest.raises(SpecdecError, match="(?s)unknown profile.*or a profile file"):
        select(CPU_16GB, cat.CATALOGUE, PROFILES, profile="gpu-3gb")


def _own_profile(folder: Path, name: str, *edits: tuple[str, str]) -> Path:
    """A user's profile file ``folder/name.yaml``: the packaged cpu profile renamed, with ``edits`` (old, new)."""
    text = (profiles_dir() / "cpu.yaml").read_text().replace("name: cpu", f"name: {name}", 1)
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_a_profile_file_of_ones_own_is_used_and_a_broken_one_says_where(tmp_path):
    own = _own_profile(tmp_path, "my-cpu")
    assert select(CPU_16GB, cat.CATALOGUE, PROFILES, profile=str(own)).profile == "my-cpu"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nmatch: [unclosed\n")
    with pytest.raises(ProfileError, match="broken.yaml"):
        select(CPU_16GB, cat.CATALOGUE, PROFILES, profile=str(broken))
    out = CliRunner().invoke(main, ["generate", "hi", "--profile", str(broken)])
    assert out.exit_code == 1 and "broken.yaml" in out.output and "Traceback" not in out.output
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe name: binary")
    for args in (["generate", "hi", "--profile", str(binary)], ["profiles", "validate", str(binary)]):
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 1 and "not UTF-8 text" in out.output and "Traceback" not in out.output, out.output
    yml = own.rename(tmp_path / "my-cpu.yml")  # the other usual name of a YAML file
    assert select(CPU_16GB, cat.CATALOGUE, PROFILES, profile=str(yml)).profile == "my-cpu"


@pytest.mark.parametrize(
    "gib,name",
    [
        (2, "gpu-4gb"),
        (4, "gpu-4gb"),
        (6, "gpu-6gb"),
        (8, "gpu-8gb"),
        (10, "gpu-12gb"),
        (12, "gpu-12gb"),
        (16, "gpu-16gb"),
        (24, "gpu-24gb"),
        (80, "gpu-24gb"),
    ],
)
def test_gpu_tiers_cover_every_size(gib, name):
    assert match_profile(assumed_gpu(gib * GIB), PROFILES).name == name
    assert match_profile(assumed_gpu(gib * GIB, backend="rocm"), PROFILES).name == name


def test_profile_settings_fill_only_what_was_not_given():
    auto = profile_settings("auto", "qwen2.5-7b", device=assumed_gpu(8 * GIB))
    assert (auto.method, auto.draft, auto.num_speculative_tokens) == ("draft", "Qwen/Qwen2.5-0.5B-Instruct", 5)
    assert auto.target_quantization == "nf4" and auto.draft_quantization is None and auto.dtype == "bfloat16"
    assert auto.options == DraftOptions()  # only the chosen method's options: no lookahead W/N/G for a draft
    given = profile_settings(
        "auto", "qwen2.5-7b", device=assumed_gpu(8 * GIB), method="none", dtype="float16", num_speculative_tokens=2
    )
    assert (given.method, given.draft, given.dtype, given.num_speculative_tokens) == ("none", None, "float16", 2)
    assert given.options == NoneOptions()
    # the banner names what runs, and the profile's own choice beside it
    assert given.notes[0].startswith("profile gpu-8gb: none (the profile's choice: draft), target")
    assert auto.notes[0].startswith("profile gpu-8gb: draft with draft Qwen/Qwen2.5-0.5B-Instruct")
    lookahead = profile_settings(
        "auto",
        "qwen2.5-7b",
        device=assumed_gpu(8 * GIB),
        method="lookahead",
        options={"window_size": 3, "ngram_size": None},
    )
    assert lookahead.options == LookaheadOptions(window_size=3, ngram_size=4, guess_size=6)
    own = LookaheadOptions(window_size=2)  # an options object is taken as it is and names the method
    assert profile_settings("auto", "qwen2.5-7b", device=assumed_gpu(8 * GIB), options=own).options is own
    with pytest.raises(SpecdecError, match="do not apply to method 'none'"):
        profile_settings("auto", "qwen2.5-7b", device=assumed_gpu(8 * GIB), method="none", options={"window_size": 3})
    with pytest.raises(SpecdecError, match="the method profile gpu-8gb chose"):
        profile_settings("auto", "qwen2.5-7b", device=assumed_gpu(8 * GIB), options={"window_size": 3})
    own_draft = profile_settings("auto", "smollm2-135m", device=CPU_16GB, draft="/my/draft")
    assert own_draft.method == "draft" and own_draft.draft == "/my/draft" and own_draft.draft_quantization is None
    assert "with draft /my/draft," in own_draft.notes[0]


# ---------------------------------------------------------------------- catalogue and estimator
def test_catalogue_is_sound():
    assert cat.validate_catalogue() == []
    for spec in cat.CATALOGUE.values():
        for draft in cat.drafts_for(spec):
            assert draft.family == spec.family


def test_catalogue_covers_the_issue_pairs():
    assert [d.name for d in cat.drafts_for(cat.CATALOGUE["llama-3.1-8b"])] == ["llama-3.2-1b"]
    assert "smollm2-135m" in [d.name for d in cat.drafts_for(cat.CATALOGUE["smollm2-1.7b"])]
    for size in ("1.5b", "3b", "7b", "14b"):
        assert "qwen2.5-0.5b" in cat.CATALOGUE[f"qwen2.5-{size}"].drafts
        assert "qwen2.5-coder-0.5b" in cat.CATALOGUE[f"qwen2.5-coder-{size}"].drafts


def test_validate_catalogue_flags_a_draft_of_another_tokenizer_family():
    bad = dict(cat.CATALOGUE)
    spec = bad["llama-3.1-8b"]
    bad["llama-3.1-8b"] = cat.ModelSpec(**{**spec.__dict__, "drafts": ("qwen2.5-0.5b",)})
    assert any("tokenizer family" in p for p in cat.validate_catalogue(bad))


def test_estimator_parts():
    spec = cat.CATALOGUE["qwen2.5-7b"]
    sizes = [cat.estimate_memory(spec, k, 4096).weights for k in ("nf4", "int8", "bf16", "fp32")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    est = cat.estimate_memory(spec, "bf16", 4096)
    assert est.kv_cache == 2 * 28 * 4 * 128 * 4096 * 2
    assert abs(est.weights - 2 * spec.params) < 0.03 * 2 * spec.params
    assert cat.estimate_memory(spec, "bf16", 4096, weights_loaded=True).weights == 0
    assert (
        cat.estimate_memory(spec, "gguf", 4096, dtype_bits=32).weights
        == cat.estimate_memory(spec, "fp32", 4096).weights
    )


def test_spec_from_a_local_config_guesses_the_family(tmp_path):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).to_dict()
    resolved = cat.resolve(str(tmp_path), config=config)
    assert resolved.spec.family == "qwen2.5" and resolved.spec.num_layers == 2
    assert [d.family for d in cat.drafts_for(resolved.spec)] == []  # nothing 4x smaller than a tiny model


# ---------------------------------------------------------------------- profile files
VALID = (profiles_dir() / "cpu.yaml").read_text()


def _write(tmp_path: Path, text: str, name: str = "cpu") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_packaged_profiles_cover_the_tiers():
    names = {p.name for p in PROFILES}
    assert {"cpu", "apple", "gpu-4gb", "gpu-6gb", "gpu-8gb", "gpu-12gb", "gpu-16gb", "gpu-24gb"} <= names
    for p in PROFILES:
        assert set(p.quantization.target) <= set(KINDS)
        assert all(t in cat.CATALOGUE for t in p.targets)


def test_wrong_type_names_file_field_and_reason(tmp_path):
    path = _write(tmp_path, VALID.replace("context_length: 4096", "context_length: lots"))
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    (problem,) = e.value.problems
    assert (problem.file, problem.field) == (str(path), "context_length")
    assert "integer" in problem.reason and "lots" in problem.reason


def test_unknown_key_names_file_field_and_reason(tmp_path):
    path = _write(tmp_path, VALID.replace("lookahead: {", "lookahead: {window: 3, "))
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    assert [(p.field, p.reason) for p in e.value.problems] == [("lookahead.window", "unknown field")]
    assert str(path) in str(e.value)


def test_missing_field_names_file_field_and_reason(tmp_path):
    path = _write(tmp_path, "\n".join(line for line in VALID.splitlines() if not line.startswith("targets")))
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    assert [(p.file, p.field, p.reason) for p in e.value.problems] == [(str(path), "targets", "Field required")]


def test_a_profile_names_only_what_it_changes(tmp_path):
    """Settings of methods a profile does not use, its draft length, context and margins have defaults: those
    of the methods' own options and of the CPU."""
    required = (
        "name",
        "description",
        "match",
        "  backends",
        "methods",
        "targets",
        "quantization",
        "  target",
        "  draft",
    )
    kept = [line for line in VALID.splitlines() if line.startswith(required)]
    short = load_profile_file(_write(tmp_path, "\n".join(kept).replace("[medusa, draft, ", "[")))
    assert short.num_speculative_tokens is None and short.context_length == 4096 and short.medusa.tree_size is None
    la = LookaheadOptions()
    assert (short.lookahead.window_size, short.lookahead.ngram_size, short.lookahead.guess_size) == (
        la.window_size,
        la.ngram_size,
        la.guess_size,
    )
    chosen = select(CPU_16GB, cat.CATALOGUE, [short], "smollm2-135m")
    assert chosen.method == "lookahead" and chosen.fits


def test_a_memory_range_no_device_is_in_is_refused(tmp_path):
    path = _write(
        tmp_path, VALID.replace("backends: [cpu]", "backends: [cpu]\n  min_memory: 10GiB\n  max_memory: 1GiB")
    )
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    (problem,) = e.value.problems
    assert problem.field == "match" and "must be above min_memory" in problem.reason


def test_nested_list_item_and_invalid_yaml(tmp_path):
    with pytest.raises(ProfileError) as e:
        parse_profile(VALID.replace("target: [gguf, bf16, int8]", "target: [gguf, int3]"), "x/cpu.yaml")
    assert e.value.problems[0].field == "quantization.target[1]"
    with pytest.raises(ProfileError) as e:
        parse_profile("name: [cpu\n", "x/cpu.yaml")
    assert e.value.problems[0].field.startswith("line ")
    with pytest.raises(ProfileError, match="must match the file name"):
        parse_profile(VALID, "x/other.yaml")


def test_find_profile():
    assert find_profile("cpu", PROFILES).match.backends == ["cpu"]


# ---------------------------------------------------------------------- CLI
REQUIRED = {
    "device",
    "profile",
    "target",
    "draft",
    "method",
    "quantization",
    "num_speculative_tokens",
    "lookahead",
    "estimated_bytes",
}


def test_detect_json_here_and_for_an_assumed_card():
    runner = CliRunner()
    here = json.loads(runner.invoke(main, ["detect", "--json"]).output)
    assert REQUIRED <= set(here) and set(here["device"]) == {"backend", "name", "total_bytes", "free_bytes"}
    assert set(here["quantization"]) == {"target", "draft"}
    assert set(here["lookahead"]) == {"window_size", "ngram_size", "guess_size"}
    assert isinstance(here["estimated_bytes"], int)
    result = runner.invoke(main, ["detect", "--vram", "8GiB", "--json"])
    card = json.loads(result.output)
    assert card["device"]["total_bytes"] == 8 * GIB and card["profile"] == "gpu-8gb"
    assert card["estimated_bytes"] <= 8 * GIB


def test_detect_text_and_bad_size():
    runner = CliRunner()
    result = runner.invoke(
        main, ["detect", "--vram", "6GiB", "--free", "1GiB", "--target", "qwen2.5-7b", "--target-loaded"]
    )
    assert result.exit_code == 0 and "profile:      gpu-6gb" in result.output
    assert runner.invoke(main, ["detect", "--vram", "lots"]).exit_code == 2
    for args, said in ((["--vram", "0"], "--vram"), (["--vram", "8GiB", "--free", "20GiB"], "--free")):
        refused = runner.invoke(main, ["detect", *args])
        assert refused.exit_code == 2 and said in refused.output, refused.output


def test_profiles_commands(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(main, ["profiles", "list"])
    assert listed.exit_code == 0 and "gpu-8gb" in listed.output
    shown = runner.invoke(main, ["profiles", "show", "gpu-8gb"])
    assert shown.exit_code == 0 and "name: gpu-8gb" in shown.output
    assert runner.invoke(main, ["profiles", "show", "nope"]).exit_code == 1
    good = _write(tmp_path, VALID)
    bad = _write(tmp_path, VALID.replace("dtype: auto", "dtype: int4"), name="bad")
    result = runner.invoke(main, ["profiles", "validate", str(good), str(bad)])
    assert result.exit_code == 1
    assert f"{good}: ok" in result.output and f"{bad}: dtype:" in result.output


# ---------------------------------------------------------------------- fitting without optional backends
DEFAULT_INSTALL = FLOAT_KINDS + ("gguf",)  # no bitsandbytes, no GPTQ


def _smallest_possible(device: DeviceInfo, available: tuple[str, ...]) -> int:
    """The least padded memory any profile target needs alone (method none) in any usable kind."""
    profile = match_profile(device, PROFILES)
    bits = 32 if profile.dtype == "float32" else 16
    needs = []
    for name in {t for p in PROFILES for t in p.targets}:
        model = cat.resolve(name)
        for kind in model.kinds():
            if kind in available:
                est = cat.estimate_memory(model.spec, kind, profile.context_length, bits)
                needs.append(int(est.total * (1 + profile.memory.margin)) + profile.memory.reserve)
    return min(needs)


@pytest.mark.parametrize("available", [DEFAULT_INSTALL, KINDS], ids=["default-install", "all-backends"])
@pytest.mark.parametrize("mib", [256, 512, 768, 1024, 2048, 3072, 4096, 6144, 8192, 10240, 12288, 16384, 24576, 49152])
def test_never_a_configuration_that_does_not_fit_when_one_does(available, mib):
    device = assumed_gpu(mib * 1024 * 1024)
    config = select(device, cat.CATALOGUE, PROFILES, available=available)
    if config.fits:
        assert config.estimated_bytes <= device.available_bytes
    else:
        assert _smallest_possible(device, available) > device.available_bytes, config.reasons


def test_twelve_gib_without_bitsandbytes_steps_down_to_a_target_that_fits():
    config = select(assumed_gpu(12 * GIB), cat.CATALOGUE, PROFILES, available=DEFAULT_INSTALL)
    assert config.fits and config.target_quantization in FLOAT_KINDS
    assert any("qwen2.5-7b as bf16: needs" in r for r in config.reasons)  # the 7B in 16-bit was tried and refused


def test_nothing_fits_names_the_extra_to_install_first():
    config = select(assumed_gpu(200 * 1024 * 1024), cat.CATALOGUE, PROFILES, available=DEFAULT_INSTALL)
    assert not config.fits
    assert config.reasons[0].startswith("nothing fits with what is installed: install specdec[bnb]")
    assert config.reasons[-1] == "nothing fits: this is the smallest configuration tried"


@pytest.mark.real_model
def test_with_a_profile_and_no_target_the_profile_chooses_the_target(tmp_path):
    """The CLI's --target has no default of its own under --profile: what `detect` shows is what runs."""
    from specdec import models

    if not models.is_pulled("smollm2-135m"):
        pytest.skip("smollm2-135m is not pulled")
    own = _own_profile(tmp_path, "small", ("targets: [qwen2.5-coder-1.5b, smollm2-135m]", "targets: [smollm2-135m]"))
    out = CliRunner().invoke(main, ["generate", "hi", "-n", "2", "--dtype", "float32", "--profile", str(own)])
    assert out.exit_code == 0, out.output
    assert "profile small: lookahead, target smollm2-135m" in out.output
