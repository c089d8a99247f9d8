"""Recipes: the paper's settings in configs/, make-style overrides, and method -> PEFT config on the same layers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from peft import IA3Config, LoraConfig, get_peft_model

from flora_hf import FLoRAConfig
from tests.models import tiny_gpt_bigcode, tiny_whisper
from trainers.recipes.recipe import (
    CONFIG_DIR,
    SECTIONS,
    Recipe,
    RecipeError,
    apply_overrides,
    coerce,
    load_recipe,
    recipe_path,
)

WHISPER_FC = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_every_recipe_in_configs_loads() -> None:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"starcoder", "whisper", "tiny-code", "tiny-whisper"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.learning_rates.keys() >= {"flora", "lora", "ia3"}


def test_starcoder_recipe_carries_the_papers_settings() -> None:
    r = load_recipe("starcoder")
    assert (r.task, r.scale, r.max_steps, r.batch_size) == ("code", "full", 1500, 8)
    assert r.learning_rates == {"flora": 8e-3, "lora": 1e-4, "ia3": 5e-3, "milora": 1e-4}  # MiLoRA: its paper
    assert r.model.startswith("bigcode/starcoder") and r.load_in_8bit
    assert r.target_modules == ["c_attn"]
    assert [r.rank_for(lang) for lang in ("perl", "ruby", "lua", "racket", "rkt")] == [1, 1, 4, 4, 4]


def test_whisper_recipe_carries_the_papers_settings() -> None:
    r = load_recipe("whisper")
    assert (r.task, r.max_steps, r.batch_size, r.model) == ("speech", 5000, 6, "openai/whisper-large")
    assert r.learning_rates == {"flora": 6e-3, "lora": 2e-4, "ia3": 4e-3, "milora": 1e-4}
    assert set(r.target_modules) == WHISPER_FC and r.load_in_8bit
    assert (r.rank_for("mr"), r.rank_for("hi"), r.rank_for("ar")) == (4, 1, 1)


def test_make_style_overrides() -> None:
    r = load_recipe(
        "starcoder",
        {"LANG": "ruby", "METHOD": "lora", "LR": "3e-4", "BATCH_SIZE": "4", "MAX_STEPS": "10", "OUTPUT_DIR": "x/y"},
    )
    assert (r.languages, r.method, r.learning_rate, r.batch_size, r.max_steps) == (["ruby"], "lora", 3e-4, 4, 10)
    assert r.resolved_output_dir() == Path("x/y")
    assert load_recipe("starcoder", {"LANGS": "perl, lua"}).languages == ["perl", "lua"]
    assert load_recipe("starcoder", {"LANG": "lua", "RANK": "2"}).rank_for("lua") == 2  # RANK beats the table
    assert load_recipe("starcoder", {"MODEL": "", "DATA": None}).model == load_recipe("starcoder").model  # make's X=
    assert load_recipe("starcoder", {"METHOD": "ia3"}).learning_rate == 5e-3
    assert load_recipe("whisper", {"LANG": "mr", "METHOD": "lora"}).resolved_output_dir() == Path(
        "out/whisper-mr-lora"
    )
    assert load_recipe("starcoder", {"LANG": "perl"}).resolved_output_dir() == Path("out/starcoder-perl")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"METHOD": "milora", "milora": {"rank": 4}}, "milora: unknown key"),
        ({"METHOD": "adalora"}, "method must be one of"),
        ({"LANGS": "perl,ruby", "METHOD": "lora"}, "only FLoRA and MiLoRA support"),
        ({"LANGS": "perl,perl"}, "listed twice"),
        ({"RANK": "0"}, "ranks must be >= 1"),
        ({"MAX_STEPS": "ten"}, "max_steps"),
        ({"NOPE": "1"}, "unknown override"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe("starcoder", overrides)


def test_unknown_recipe_and_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="known recipes"):
        recipe_path("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: code\nmodel: m\nlearning_rate: 1\n")
    with pytest.raises(RecipeError, match="unknown recipe key"):
        load_recipe(bad)


def test_data_sources(tmp_path: Path) -> None:
    for lang in ("perl", "ruby"):
        (tmp_path / lang).mkdir()
    multi = load_recipe("starcoder", {"LANGS": "perl,ruby", "DATA": str(tmp_path)})
    assert multi.data_sources() == {"perl": str(tmp_path / "perl"), "ruby": str(tmp_path / "ruby")}
    single = load_recipe("starcoder", {"LANG": "lua", "DATA": str(tmp_path / "perl")})
    assert single.data_sources() == {"lua": str(tmp_path / "perl")}
    pairs = load_recipe("starcoder", {"LANGS": "perl,lua", "DATA": "perl=/a,lua=/b"})
    assert pairs.data_sources() == {"perl": "/a", "lua": "/b"}
    assert load_recipe("starcoder").data_sources() == {"perl": None}  # The Stack
    with pytest.raises(RecipeError, match="one sub-folder per language"):
        load_recipe("starcoder", {"LANGS": "perl,lua", "DATA": str(tmp_path)}).data_sources()


@pytest.mark.parametrize("method", ["flora", "lora", "ia3"])
def test_methods_adapt_the_recipes_layers(method: str) -> None:
    code = load_recipe("starcoder", {"METHOD": method, "LANG": "lua"})
    config = code.peft_config("lua")
    expected = {"flora": FLoRAConfig, "lora": LoraConfig, "ia3": IA3Config}[method]
    assert isinstance(config, expected)
    model = get_peft_model(tiny_gpt_bigcode(), config)
    assert model.get_nb_trainable_parameters()[0] > 0
    if method != "ia3":
        assert set(config.target_modules) == {"c_attn"} and config.r == 4  # Lua
    else:  # the paper's IA3 is PEFT's default for GPTBigCode: c_attn, and mlp.c_proj as feed-forward
        applied = model.peft_config["default"]
        assert set(applied.target_modules) == {"c_attn", "mlp.c_proj"}
        assert set(applied.feedforward_modules) == {"mlp.c_proj"}

    speech = load_recipe("whisper", {"METHOD": method})
    config = speech.peft_config("mr")
    assert set(config.target_modules) == WHISPER_FC
    if method == "ia3":
        assert set(config.feedforward_modules) == {"fc1", "fc2"}
    model = get_peft_model(tiny_whisper(), config)
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "base_layer")}
    assert adapted == WHISPER_FC


def test_apply_overrides_keeps_the_recipe_typed() -> None:
    r = apply_overrides(load_recipe("tiny-code"), {"rank_overrides": {"Perl": 3}, "balance_languages": "yes"})
    assert r.rank_for("perl") == 3 and r.balance_languages is True
    assert "learning_rates:" in r.to_yaml()


def test_every_key_is_declared_once_with_its_help_and_section() -> None:
    """The field list is the recipe's whole schema: parsing, the YAML keys and the docs all come from it."""
    for f in dataclasses.fields(Recipe):
        assert f.metadata.get("help"), f.name
        assert f.metadata.get("section") in SECTIONS, f.name


@pytest.mark.parametrize(
    ("key", "raw", "parsed"),
    [
        ("rank", "4", 4),
        ("lr", "1e-3", 1e-3),
        ("load_in_8bit", "on", True),
        ("per_adapter_clipping", "no", False),
        ("languages", "perl, ruby", ["perl", "ruby"]),
        ("target_modules", ["c_attn"], ["c_attn"]),
        ("rank_overrides", {"Lua": "4"}, {"lua": 4}),
        ("name", 2024, "2024"),
        ("eval_batch_size", "", None),
    ],
)
def test_values_parse_by_the_fields_declared_types(key: str, raw, parsed) -> None:
    assert coerce(key, raw) == parsed


@pytest.mark.parametrize(("key", "raw"), [("rank", "four"), ("load_in_8bit", "maybe"), ("lr", [1]), ("model", ["a"])])
def test_a_value_of_the_wrong_type_names_the_key(key: str, raw) -> None:
    with pytest.raises(RecipeError, match=rf"^{key}: cannot use"):
        coerce(key, raw)


def test_ia3_on_the_recipes_layers_or_peft_defaults() -> None:
    own = load_recipe("starcoder", {"METHOD": "ia3", "ia3_modules": "recipe"}).peft_config("perl")
    assert set(own.target_modules) == {"c_attn"} and not own.feedforward_modules
    with pytest.raises(RecipeError, match="ia3_modules must be one of"):
        load_recipe("starcoder", {"ia3_modules": "all"})
