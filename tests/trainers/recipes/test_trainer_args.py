"""Trainer arguments pass through flora-train as HF Trainer users expect: ``--set report_to=tensorboard`` reports to
TensorBoard, ``push_to_hub`` is checked before loading, names a run owns are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainers.recipe_fixtures import cli_args, code_assets, code_overrides
from trainers.recipes.recipe import RecipeError, load_recipe
from trainers.recipes.training import training_arguments
from trainers.train import main, preflight


def test_report_to_tensorboard_writes_event_files(tmp_path: Path, tmp_path_factory) -> None:
    overrides = code_overrides(code_assets(tmp_path_factory), tmp_path, MAX_STEPS=3, save_steps=3)
    assert main([*cli_args("tiny-code", overrides), "--set", "report_to=tensorboard"]) == 0
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    saved = load_recipe(tmp_path / "recipe.yaml")
    assert saved.trainer_args == {"report_to": "tensorboard"}  # the rerun reports the same way


def test_trainer_arguments_reach_the_trainer_and_the_recipe_keeps_its_own() -> None:
    recipe = load_recipe(
        "tiny-code", {"report_to": ["tensorboard"], "torch_compile": False, "learning_rate": 1e-3, "MAX_STEPS": 7}
    )
    assert recipe.lr == 1e-3 and recipe.trainer_args == {"report_to": ["tensorboard"], "torch_compile": False}
    args = training_arguments(recipe, Path("out"), has_eval=False, progress=False)
    assert args.report_to == ["tensorboard"] and args.learning_rate == 1e-3 and args.max_steps == 7
    default = training_arguments(load_recipe("tiny-code"), Path("out"), has_eval=False, progress=False)
    assert default.report_to == []  # "none" unless asked


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"remove_unused_columns": True}, "adapter name"),
        ({"no_such_argument": 1}, "unknown override"),
        ({"trainer_args": {"max_steps": 3}}, "recipe setting"),
    ],
)
def test_arguments_a_run_owns_or_that_do_not_exist_are_refused(override, message) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny-code", override)


def test_reporters_and_push_to_hub_are_checked_before_loading(tmp_path: Path) -> None:
    recipe = load_recipe("tiny-code", {"OUTPUT_DIR": str(tmp_path), "report_to": "wandb", "push_to_hub": True})
    problems = preflight(recipe, reachable=False)
    assert any("report_to=wandb" in p and "not installed" in p for p in problems), problems
    assert any("push_to_hub" in p and "unreachable" in p for p in problems), problems
