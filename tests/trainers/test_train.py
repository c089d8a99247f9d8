"""flora-train end to end on tiny local models: loss goes down, adapters load in PEFT and in flora-serve, resuming
reaches the same state, and a multi-language run updates each adapter from its own language only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from serving.adapters.loader import load_adapter_folder
from trainers.data.code import CodeCollator, PackedCodeDataset
from trainers.recipes.datasets import RecipeData
from trainers.recipes.recipe import load_recipe
from trainers.recipes.training import attach_adapters, loss_series, set_generation_language, train
from trainers.train import main, preflight

from .recipe_fixtures import code_assets, code_overrides, speech_assets, speech_overrides, trained_run

WEIGHTS = "adapter_model.safetensors"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def _assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0.0, msg=key)


def _train_losses(history: list[dict]) -> list[float]:
    return [loss for _, loss in loss_series(history)["train"]]


# ------------------------------------------------------------------------------------------------------- code
@pytest.fixture(scope="module")
def code_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLoRA run through the command line (the real recipe path): 6 steps, checkpoints at 3 and 6."""
    return trained_run(tmp_path_factory, "code")


def test_code_run_lowers_loss_and_writes_its_outputs(code_run: Path) -> None:
    summary = json.loads((code_run / "train_summary.json").read_text())
    losses = _train_losses(summary["log_history"])
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    assert (code_run / "loss.png").stat().st_size > 1000
    assert (code_run / "recipe.yaml").is_file() and (code_run / "checkpoint-3").is_dir()
    config = json.loads((code_run / "alpha" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FLORA" and config["r"] == 1 and config["target_modules"] == ["c_attn"]
    assert summary["metrics"]["eval_loss"] > 0


def test_code_adapter_loads_in_peft_and_in_flora_serve(code_run: Path) -> None:
    from transformers import GPTBigCodeForCausalLM

    model_dir = json.loads((code_run / "train_summary.json").read_text())["base_model"]
    base = GPTBigCodeForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(3, 200, (2, 12))
    plain = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, str(code_run / "alpha"), adapter_name="alpha").eval()
    adapted = loaded(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)  # the trained adapter changes the model
    served = load_adapter_folder("alpha", code_run / "alpha", loaded.get_base_model(), max_rank=8)
    assert served.method == "flora" and served.rank == 1 and served.modules


def test_code_resume_reaches_the_same_state(code_run: Path, tmp_path: Path, tmp_path_factory) -> None:
    overrides = code_overrides(code_assets(tmp_path_factory), tmp_path, RESUME=str(code_run / "checkpoint-3"))
    recipe = load_recipe("tiny-code", overrides)
    result = train(recipe, progress=False)
    assert result.trainer.state.global_step == 6
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(code_run / "checkpoint-3")
    _assert_same_weights(result.adapter_dirs["alpha"], code_run / "alpha", atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_other_methods_train_and_serve(method: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    assets = code_assets(tmp_path_factory)
    recipe = load_recipe("tiny-code", code_overrides(assets, tmp_path, METHOD=method, MAX_STEPS=3, save_steps=3))
    result = train(recipe, progress=False)
    config = json.loads((result.adapter_dirs["alpha"] / "adapter_config.json").read_text())
    # tiny-code runs IA3 as the paper did (PEFT's default for GPTBigCode: attention plus the feed-forward c_proj)
    expected = {"lora": ["c_attn"], "ia3": ["c_attn", "mlp.c_proj"]}[method]
    assert config["peft_type"] == method.upper() and sorted(config["target_modules"]) == expected
    if method == "ia3":
        assert config["feedforward_modules"] == ["mlp.c_proj"]
    served = load_adapter_folder("alpha", result.adapter_dirs["alpha"], result.model.get_base_model(), max_rank=8)
    assert served.method == method


# ------------------------------------------------------------------------------------------ multi-language
def _packed(blocks: torch.Tensor, lang: str) -> PackedCodeDataset:
    return PackedCodeDataset.single(blocks, lang)


def test_a_batch_of_one_language_leaves_the_other_adapter_unchanged(tmp_path_factory, tmp_path: Path) -> None:
    from transformers import GPTBigCodeForCausalLM

    assets = code_assets(tmp_path_factory)
    recipe = load_recipe("tiny-code", code_overrides(assets, tmp_path, LANGS="alpha,beta"))
    model = attach_adapters(GPTBigCodeForCausalLM.from_pretrained(assets["model"]), recipe)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".beta" in n for n in before) and any(".alpha" in n for n in before)  # both trainable
    batch = CodeCollator()([_packed(torch.randint(3, 200, (4, 16)), "alpha")[i] for i in range(4)])
    assert batch["adapter_names"] == ["alpha"] * 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if ".beta" in name:
            assert param.grad is None or not param.grad.any(), name
    optimizer.step()
    for name, param in model.named_parameters():
        if name in before:
            changed = not torch.equal(param, before[name])
            assert changed == (".alpha" in name), name


def test_mixed_run_updates_each_adapter_from_its_own_examples_only(tmp_path_factory, tmp_path: Path) -> None:
    """Two mixed-batch runs that differ only in beta's examples: alpha ends identical, beta does not. Clipping is
    made active (max_grad_norm tiny) to check that it is per adapter."""
    assets = code_assets(tmp_path_factory)
    g = torch.Generator().manual_seed(0)
    alpha = _packed(torch.randint(3, 250, (12, 32), generator=g), "alpha")
    finals = {}
    for variant in ("one", "two"):
        beta = _packed(torch.randint(3, 250, (12, 32), generator=g), "beta")
        recipe = load_recipe(
            "tiny-code",
            code_overrides(assets, tmp_path / variant, LANGS="alpha,beta", MAX_STEPS=4, max_grad_norm=1e-3),
        )
        data = RecipeData(
            PackedCodeDataset.concat([alpha, beta], 32),
            {"alpha": alpha, "beta": beta},
            CodeCollator(adapter_key="adapter_names"),
        )
        result = train(recipe, progress=False, data=data)
        assert {"eval_alpha_loss", "eval_beta_loss"} <= set(result.metrics)
        finals[variant] = result.adapter_dirs
    _assert_same_weights(finals["one"]["alpha"], finals["two"]["alpha"], atol=1e-7)
    with pytest.raises(AssertionError):
        _assert_same_weights(finals["one"]["beta"], finals["two"]["beta"], atol=1e-7)


# ----------------------------------------------------------------------------------------------------- speech
@pytest.fixture(scope="module")
def speech_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory, "speech")


def test_whisper_run_lowers_loss_and_adapter_loads_in_peft_and_serve(speech_run: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    summary = json.loads((speech_run / "train_summary.json").read_text())
    losses = _train_losses(summary["log_history"])
    assert sum(losses[-2:]) < sum(losses[:2])
    config = json.loads((speech_run / "mr" / "adapter_config.json").read_text())
    assert config["r"] == 4  # the paper's rank for Marathi
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    base = WhisperForConditionalGeneration.from_pretrained(summary["base_model"]).eval()

    loaded = PeftModel.from_pretrained(base, str(speech_run / "mr"), adapter_name="mr")
    served = load_adapter_folder("mr", speech_run / "mr", loaded.get_base_model(), max_rank=8)
    assert served.method == "flora" and served.rank == 4


def test_whisper_generation_language_is_set_the_transformers_way(tmp_path_factory) -> None:
    from transformers import WhisperForConditionalGeneration

    assets = speech_assets(tmp_path_factory)
    model = WhisperForConditionalGeneration.from_pretrained(assets["model"])
    set_generation_language(model, load_recipe("tiny-whisper", {"LANG": "marathi"}))
    config = model.generation_config
    assert (config.language, config.task, config.forced_decoder_ids) == ("mr", "transcribe", None)
    multi = WhisperForConditionalGeneration.from_pretrained(assets["model"])
    set_generation_language(multi, load_recipe("tiny-whisper", {"LANGS": "mr,hi"}))
    assert getattr(multi.generation_config, "language", None) is None  # per call: generate(language=...)


def test_whisper_resume_reaches_the_same_state(speech_run: Path, tmp_path: Path, tmp_path_factory) -> None:
    assets = speech_assets(tmp_path_factory)
    overrides = speech_overrides(assets, tmp_path, RESUME=str(speech_run / "checkpoint-3"))
    result = train(load_recipe("tiny-whisper", overrides), progress=False)
    _assert_same_weights(result.adapter_dirs["mr"], speech_run / "mr", atol=1e-6)


# ----------------------------------------------------------------------------------------------- fail fast
def test_full_scale_recipe_fails_fast_without_the_hub(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--recipe", "starcoder", "--lang", "perl"]) == 2
    err = capsys.readouterr().err
    assert "MODEL=path/to/folder" in err and "DATA=path/to/perl-sources" in err
    recipe = load_recipe("whisper", {"LANG": "mr"})
    problems = preflight(recipe, allow_cpu=False, reachable=False)
    assert len(problems) == 2 and "openai/whisper-large" in problems[0] and "cv-corpus" in problems[1]


def test_a_deepspeed_run_that_cannot_start_is_not_announced_as_launching(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--recipe", "starcoder", "--lang", "perl", "--deepspeed", "configs/ds_zero2.json", "--num-gpus", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot start this run" in err and "launching" not in err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, tmp_path_factory, capsys) -> None:
    assets = code_assets(tmp_path_factory)
    code = main(
        ["--recipe", "tiny-code", "--model", str(assets["model"]), "--data", str(assets["data"]), "--lang", "alpha"]
        + ["--output-dir", str(tmp_path), "--resume"]
    )
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_print_recipe(capsys) -> None:
    assert main(["--recipe", "starcoder", "--langs", "perl,lua", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "languages:\n- perl\n- lua" in out and "learning_rates" in out


def test_a_missing_relative_model_folder_is_named_as_a_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    from trainers.recipes.base_models import model_problem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert model_problem("models/tiny-code", lambda: True) == (
        f"model folder models/tiny-code does not exist (no folder {tmp_path / 'models' / 'tiny-code'})"
    )
    # no models/ here either: offline, the message says there is no such folder before treating it as a hub id
    problem = model_problem("weights/tiny-code", lambda: False)
    assert problem.startswith(f"cannot load model 'weights/tiny-code': there is no folder {tmp_path / 'weights'}")
    assert main(["--recipe", "tiny-code", "--model", "models/tiny-code", "--output-dir", str(tmp_path / "o")]) == 2
    assert "model folder models/tiny-code does not exist" in capsys.readouterr().err


def test_each_adapter_folder_has_a_filled_model_card(code_run: Path) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(code_run / "alpha" / "README.md")
    assert card.data.library_name == "peft" and "flora" in card.data.tags
    text = card.content
    assert "[More Information Needed]" not in text
    for fact in ("FLoRA adapter `alpha`", "| rank | 1 |", "| optimizer steps | 6 |", "| eval_loss |", "12 documents"):
        assert fact in text, fact
    run_card = (code_run / "README.md").read_text()
    assert "[More Information Needed]" not in run_card and "alpha/README.md" in run_card
