"""Fixtures the benchmark tests share."""

from pathlib import Path

import pytest

from tests.serving.tiny_serving import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny causal LM and its tokenizer saved as a model folder, for benchmarks that start real servers."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_causal_lm().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
