"""A recipe's datasets: the built-in corpus refuses what it does not have (the recipes' data paths are exercised by
tests/trainers/test_train.py and the data tests)."""

from __future__ import annotations

import pytest

from trainers.recipes.datasets import builtin_code_data
from trainers.recipes.recipe import RecipeError


def test_builtin_code_data_names_unknown_languages() -> None:
    with pytest.raises(RecipeError, match="DATA=folder"):
        builtin_code_data(("cobol",))
