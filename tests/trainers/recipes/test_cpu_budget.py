"""Full-scale recipes on a machine without CUDA: a model that fits trains with its cost stated; one too large is
refused unless --allow-cpu (make ALLOW_CPU=1)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from trainers.recipes import cpu_budget
from trainers.recipes.cpu_budget import count_parameters, cpu_run_problem, estimate_cpu_cost
from trainers.recipes.recipe import load_recipe
from trainers.train import preflight

CODE_CONFIG = GPTBigCodeConfig(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=2, n_inner=64)


@pytest.fixture
def code_model_folder(tmp_path: Path) -> Path:
    CODE_CONFIG.save_pretrained(tmp_path)
    return tmp_path


def test_parameters_are_counted_from_the_config_alone() -> None:
    assert count_parameters(CODE_CONFIG, "code") == GPTBigCodeForCausalLM(CODE_CONFIG).num_parameters()
    speech = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=120, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    assert count_parameters(speech, "speech") == WhisperForConditionalGeneration(speech).num_parameters()


def test_cost_follows_parameters_steps_and_the_models_positions(code_model_folder: Path) -> None:
    recipe = load_recipe("starcoder", {"MODEL": str(code_model_folder), "MAX_STEPS": 10, "BATCH_SIZE": 2})
    cost = estimate_cpu_cost(recipe, CODE_CONFIG)
    assert cost.tokens == 10 * 2 * 128  # blocks are cut to the model's 128 positions, not the recipe's 2048
    assert cost.flops == 6 * cost.parameters * cost.tokens and cost.hours > 0
    assert cost.memory_bytes == int(cost.parameters * 4 * 1.5)


def test_a_model_that_fits_trains_with_a_warning(code_model_folder: Path, caplog) -> None:
    recipe = load_recipe("starcoder", {"MODEL": str(code_model_folder), "DATA": str(code_model_folder)})
    with caplog.at_level(logging.WARNING):
        assert cpu_run_problem(recipe, allow_cpu=False) is None
    assert (
        "on the CPU" in caplog.text
        and f"{GPTBigCodeForCausalLM(CODE_CONFIG).num_parameters():,} parameters" in caplog.text
    )


def test_a_model_too_large_for_memory_is_refused_unless_allowed(code_model_folder: Path, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(cpu_budget, "available_memory_bytes", lambda: 1000)
    recipe = load_recipe("starcoder", {"MODEL": str(code_model_folder), "DATA": str(code_model_folder)})
    problem = cpu_run_problem(recipe, allow_cpu=False)
    assert problem is not None and "too large for this machine" in problem and "ALLOW_CPU=1" in problem
    problems = preflight(recipe, allow_cpu=False, reachable=False)
    assert len(problems) == 1 and "too large for this machine" in problems[0]
    assert cpu_run_problem(recipe, allow_cpu=True) is None
    assert preflight(recipe, allow_cpu=True, reachable=False) == []
