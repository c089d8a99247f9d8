"""MiLoRA through the training recipes: the trainer adds λ·L_lb, bi-level optimization keeps the rational
coefficients (Θ) on validation steps and the LoRA/router weights (Ω) on training steps, one Θ step per optimizer
step under gradient accumulation, Θ's optimizer is checkpointed and resumed, and the adapter loads in PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from tests.trainers.recipe_fixtures import cli_args, code_assets, code_overrides, speech_assets, speech_overrides
from trainers.recipes.base_models import load_base
from trainers.recipes.bilevel import RATIONAL_STATE_NAME, is_rational_parameter
from trainers.recipes.datasets import RecipeData, build_data
from trainers.recipes.recipe import RecipeError, load_recipe
from trainers.recipes.training import attach_adapters, make_trainer, train
from trainers.train import main, preflight

WEIGHTS = "adapter_model.safetensors"
# Θ's rate is raised from the paper's 1e-6 so that resuming without its optimizer state is visibly different
MILORA = {"r": 4, "top_k": 2, "pooler": "attention", "rational_lr": 1e-2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return code_assets(tmp_path_factory)


def _overrides(assets: dict[str, Path], output_dir: Path, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "METHOD": "milora",
        "milora": dict(MILORA),
        "learning_rates": {"milora": 1e-2},
        "eval_steps": 100,
    }
    values.update(extra)
    return code_overrides(assets, output_dir, **values)


def _trainer(recipe: Any, data: Any = None) -> tuple[Any, Any]:
    base = load_base(recipe, progress=False)
    data = data or build_data(recipe, base)
    torch.manual_seed(recipe.seed)
    model = attach_adapters(base.model, recipe)
    return make_trainer(recipe, model, data, base, recipe.resolved_output_dir(), progress=False), data


def _split(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Θ, Ω) snapshots: rational coefficients, and every other adapter parameter."""
    theta, omega = {}, {}
    for name, param in model.named_parameters():
        if is_rational_parameter(name):
            theta[name] = param.detach().clone()
        elif "milora_" in name:
            omega[name] = param.detach().clone()
    return theta, omega


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in a if not torch.equal(a[name], b[name])}


# ----------------------------------------------------------------------------------------------------- recipe
def test_recipe_builds_milora_configs() -> None:
    recipe = load_recipe("tiny-code", {"METHOD": "milora"})
    config = recipe.peft_config("perl")
    assert type(config).__name__ == "MiLoRAConfig"
    assert (config.r, config.top_k, config.pooler, config.rational_lr) == (8, 3, "attention", 1e-6)
    assert config.target_modules is None  # MiLoRA's per-model experts, not the other methods' [c_attn]
    assert recipe.learning_rate == 3e-3 and recipe.resolved_output_dir().name == "tiny-code-perl-milora"
    assert load_recipe("tiny-code", {"METHOD": "milora", "RANK": 16}).peft_config("perl").r == 16
    merged = load_recipe("tiny-code", {"METHOD": "milora", "milora": {"top_k": 1}}).milora
    assert merged["top_k"] == 1 and merged["r"] == 8  # an override updates the mapping key by key
    for name in ("starcoder", "whisper"):
        full = load_recipe(name, {"METHOD": "milora"})
        assert full.learning_rate == 1e-4 and full.peft_config(full.languages[0]).r == 32
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe("tiny-code", {"METHOD": "milora", "milora": {"rank": 4}})
    with pytest.raises(RecipeError, match="top_k"):
        load_recipe("tiny-code", {"METHOD": "milora", "milora": {"top_k": 0}}).peft_config("perl")
    problems = preflight(
        load_recipe("tiny-code", {"METHOD": "milora", "DEEPSPEED": "configs/ds_zero3.json"}), reachable=False
    )
    assert any("ZeRO-3" in p for p in problems)


# ------------------------------------------------------------------------------------------------------- loss
def test_training_loss_adds_the_weighted_load_balance_loss(assets, tmp_path: Path) -> None:
    coef = 0.5
    recipe = load_recipe("tiny-code", _overrides(assets, tmp_path, milora={**MILORA, "load_balance_coef": coef}))
    trainer, data = _trainer(recipe)
    model = trainer.model
    batch = data.collator([data.train[i] for i in range(4)])
    model.train()
    out = model(**batch)
    assert out.load_balance_loss > 0
    expected = out.loss + coef * out.load_balance_loss
    torch.testing.assert_close(trainer.compute_loss(model, batch), expected)
    # gradient accumulation over 2 micro-batches: the task loss is normalized over both (num_items_in_batch), and
    # λ·L_lb is halved to match, so the accumulated objective is the mean of the micro-batches' objectives
    assert trainer.model_accepts_loss_kwargs
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    trainer.current_gradient_accumulation_steps = 2
    torch.testing.assert_close(trainer.compute_loss(model, batch, num_items_in_batch=2 * n_items), expected / 2)
    model.eval()
    with torch.no_grad():
        plain = model(**batch)
        assert "load_balance_loss" not in plain  # eval: task loss only
        torch.testing.assert_close(trainer.compute_loss(model, batch), plain.loss)


# ------------------------------------------------------------------------------------------------- bi-level
class Spy(TrainerCallback):
    """Snapshots Θ and Ω around each piece of an optimizer step and records what changed where."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.log: list[dict[str, Any]] = []
        self.substeps = 0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.begin = _split(self.model)

    def on_substep_end(self, args, state, control, **kwargs) -> None:
        self.substeps += 1
        theta, omega = _split(self.model)  # mid-accumulation: nothing moves
        assert not _changed(self.begin[0], theta) and not _changed(self.begin[1], omega)

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.after_train = _split(self.model)
        self.theta_grads = [p.grad for n, p in self.model.named_parameters() if is_rational_parameter(n)]

    def on_step_end(self, args, state, control, **kwargs) -> None:
        end = _split(self.model)
        self.log.append(
            {
                "train_theta": _changed(self.begin[0], self.after_train[0]),
                "train_omega": _changed(self.begin[1], self.after_train[1]),
                "val_theta": _changed(self.after_train[0], end[0]),
                "val_omega": _changed(self.after_train[1], end[1]),
                "n_theta": len(end[0]),
                "theta_grads_in_training": sum(g is not None for g in self.theta_grads),
                "grads_left": [n for n, p in self.model.named_parameters() if p.grad is not None],
            }
        )


def test_bilevel_theta_moves_only_on_validation_steps_once_per_optimizer_step(assets, tmp_path: Path) -> None:
    recipe = load_recipe("tiny-code", _overrides(assets, tmp_path, MAX_STEPS=3, gradient_accumulation_steps=2))
    trainer, _ = _trainer(recipe)
    spy = Spy(trainer.model)
    trainer.add_callback(spy)  # after the trainer's own Θ-step callback: sees the state after Θ's step
    trainer.train()
    assert trainer.state.global_step == 3 and len(spy.log) == 3 and spy.substeps == 3
    for step in spy.log:
        assert step["n_theta"] > 0 and step["train_omega"]  # the training step moved Ω ...
        assert not step["train_theta"] and step["theta_grads_in_training"] == 0  # ... and gave Θ nothing
        assert len(step["val_theta"]) == step["n_theta"]  # the validation step moved every Θ tensor ...
        assert not step["val_omega"] and not step["grads_left"]  # ... no Ω, and left no gradient behind
    # one Θ step per optimizer step, over gradient_accumulation_steps validation micro-batches each
    assert trainer.rational_steps == 3 and trainer.rational_batches.served == 3 * 2
    assert trainer.rational_optimizer.param_groups[0]["lr"] < 1e-2  # the recipe's schedule (cosine) applies
    main_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    theta_params = {id(p) for n, p in trainer.model.named_parameters() if is_rational_parameter(n)}
    assert not main_params & theta_params  # Θ is not in the main optimizer
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("load_balance_loss" in entry for entry in logged)
    assert "rational_loss" in logged[-1] and logged[-1]["load_balance_loss"] > 0


# ----------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def milora_run(assets, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """6 steps, checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("milora-run")
    return train(load_recipe("tiny-code", _overrides(assets, root, save_steps=3)), progress=False)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def _theta_key(key: str) -> bool:
    """Saved weights drop the adapter name: ``...prompt_router.milora_num``."""
    return key.endswith((".milora_num", ".milora_den"))


def test_resume_restores_the_rational_optimizer(milora_run, assets, tmp_path: Path) -> None:
    checkpoint = milora_run.output_dir / "checkpoint-3"
    state = torch.load(checkpoint / RATIONAL_STATE_NAME, weights_only=True)
    assert state["steps"] == 3 and state["optimizer"]["state"]
    final = _weights(milora_run.adapter_dirs["alpha"])
    assert any(_theta_key(k) for k in final)

    resumed = train(load_recipe("tiny-code", _overrides(assets, tmp_path / "a", RESUME=str(checkpoint))), False)
    assert resumed.trainer.rational_steps == 6
    again = _weights(resumed.adapter_dirs["alpha"])
    assert again.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(again[key], final[key], atol=1e-6, rtol=0.0, msg=key)

    # without Θ's optimizer state the resumed run is a different one (the state matters, and was restored above)
    bare = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, bare)
    (bare / RATIONAL_STATE_NAME).unlink()
    other = train(load_recipe("tiny-code", _overrides(assets, tmp_path / "b", RESUME=str(bare))), False)
    differs = _weights(other.adapter_dirs["alpha"])
    assert any(not torch.allclose(differs[k], final[k], atol=1e-6) for k in final if _theta_key(k))


def test_saved_adapter_loads_with_peft(milora_run) -> None:
    from transformers import GPTBigCodeForCausalLM

    folder = milora_run.adapter_dirs["alpha"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "MILORA" and config["r"] == 4
    assert set(config["target_modules"]) == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    summary = json.loads((milora_run.output_dir / "train_summary.json").read_text())
    assert any(line.startswith("MiLoRA: bi-level") for line in summary["data"])
    base = GPTBigCodeForCausalLM.from_pretrained(summary["base_model"]).eval()
    ids = torch.randint(3, 200, (2, 12))
    plain = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, str(folder), adapter_name="alpha").eval()
    assert not torch.allclose(loaded(input_ids=ids).logits, plain)
    trained = _weights(folder)
    params = dict(loaded.named_parameters())
    theta = [k for k in trained if _theta_key(k)]
    assert theta
    for key in theta:  # saved without the adapter name, loaded under it
        torch.testing.assert_close(params[f"{key}.alpha"].detach(), trained[key])


# ------------------------------------------------------------------------------------------------ edge cases
def test_without_validation_data_theta_stays_at_its_init(assets, tmp_path: Path, caplog) -> None:
    recipe = load_recipe("tiny-code", _overrides(assets, tmp_path, MAX_STEPS=2))
    base = load_base(recipe, progress=False)
    full = build_data(recipe, base)
    trainer, data = _trainer(recipe, RecipeData(full.train, {}, full.collator, []))
    theta, _ = _split(trainer.model)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.rational_batches is None and trainer.rational_steps == 0
    assert not _changed(theta, _split(trainer.model)[0])
    assert any("no validation data" in line for line in data.summary)


def test_flora_train_cli_runs_milora(assets, tmp_path: Path) -> None:
    assert main(cli_args("tiny-code", _overrides(assets, tmp_path, MAX_STEPS=2))) == 0
    assert json.loads((tmp_path / "alpha" / "adapter_config.json").read_text())["peft_type"] == "MILORA"


def test_multi_language_milora_run(assets, tmp_path: Path) -> None:
    recipe = load_recipe("tiny-code", _overrides(assets, tmp_path, LANGS="alpha,beta", MAX_STEPS=2))
    result = train(recipe, progress=False)
    assert result.trainer.rational_steps == 2
    for lang in ("alpha", "beta"):
        assert any(_theta_key(k) for k in _weights(result.adapter_dirs[lang]))


def test_whisper_milora_run(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """The speech recipe (Seq2SeqTrainer): experts on the encoder and decoder layers, Θ on the dev split."""
    assets = speech_assets(tmp_path_factory)
    values = {"METHOD": "milora", "milora": dict(MILORA), "learning_rates": {"milora": 1e-2}, "MAX_STEPS": 2}
    result = train(load_recipe("tiny-whisper", speech_overrides(assets, tmp_path, **values)), progress=False)
    assert result.trainer.rational_steps == 2
    logged = [entry for entry in result.log_history if "loss" in entry]
    assert logged and all("load_balance_loss" in entry and "rational_loss" in entry for entry in logged)
    config = json.loads((result.adapter_dirs["mr"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "MILORA"
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    weights = _weights(result.adapter_dirs["mr"])
    assert any(".encoder." in k and _theta_key(k) for k in weights) and any(".decoder." in k for k in weights)
