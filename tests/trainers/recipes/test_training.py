"""train()'s end-of-run evaluation: the Trainer's own last-step eval is reused, not run a second time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.trainers.recipe_fixtures import code_assets, code_overrides
from trainers.recipes.recipe import load_recipe
from trainers.recipes.training import final_evaluation, train


def _fake_trainer(history: list[dict], best_at_end: bool = False) -> SimpleNamespace:
    calls: list[int] = []
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=4, log_history=history),
        args=SimpleNamespace(load_best_model_at_end=best_at_end),
        evaluate=lambda: calls.append(1) or {"eval_loss": 9.0},
    )
    trainer.calls = calls
    return trainer


def test_the_last_steps_logged_eval_is_reused_per_dataset() -> None:
    history = [
        {"loss": 3.0, "step": 4},
        {"eval_alpha_loss": 1.0, "eval_alpha_runtime": 0.1, "epoch": 1.0, "step": 4},
        {"eval_beta_loss": 2.0, "eval_beta_runtime": 0.1, "epoch": 1.0, "step": 4},
        {"eval_alpha_loss": 5.0, "step": 2},  # an earlier eval: not the trained model's
    ]
    trainer = _fake_trainer(history)
    metrics = final_evaluation(trainer)
    assert metrics == {"eval_alpha_loss": 1.0, "eval_alpha_runtime": 0.1, "eval_beta_loss": 2.0,
                       "eval_beta_runtime": 0.1, "epoch": 1.0}  # fmt: skip
    assert trainer.calls == []


@pytest.mark.parametrize("best_at_end", [False, True])
def test_a_fresh_eval_without_a_last_step_eval_or_when_the_best_checkpoint_is_kept(best_at_end: bool) -> None:
    history = [{"eval_loss": 1.0, "step": 4 if best_at_end else 2}]
    trainer = _fake_trainer(history, best_at_end)
    assert final_evaluation(trainer) == {"eval_loss": 9.0} and trainer.calls == [1]


def test_a_real_run_evaluates_once_at_the_end_with_the_same_result(tmp_path_factory, tmp_path: Path) -> None:
    overrides = code_overrides(code_assets(tmp_path_factory), tmp_path, LANGS="alpha,beta", MAX_STEPS=4)
    result = train(load_recipe("tiny-code", {**overrides, "eval_steps": 10**6}), progress=False)
    last = [e for e in result.log_history if e.get("step") == 4 and any(k.startswith("eval_") for k in e)]
    assert len(last) == 2  # the Trainer's own end-of-training eval, one entry per language, nothing repeated
    fresh = result.trainer.evaluate()
    for lang in ("alpha", "beta"):
        assert result.metrics[f"eval_{lang}_loss"] == pytest.approx(fresh[f"eval_{lang}_loss"], abs=1e-6)
