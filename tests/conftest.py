"""Every test starts from the same seed, with library warnings silenced."""

import warnings

import pytest
import torch

import flora_hf  # noqa: F401  (registers FLoRA with PEFT)


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
