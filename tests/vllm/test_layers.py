"""The plugin's registration and its guards, in-process (no engine): idempotent install, class order, compile guard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: make setup-vllm creates .venv-vllm; make test-vllm runs these"
)

import vllm.lora.utils as lora_utils  # noqa: E402
from vllm.config.compilation import CompilationMode, CUDAGraphMode  # noqa: E402
from vllm.lora.model_manager import LoRAModelManager  # noqa: E402

from flora_hf.vllm_plugin import register  # noqa: E402
from flora_hf.vllm_plugin.layers import _compiled, flora_lora_classes  # noqa: E402


def test_register_is_idempotent_and_puts_the_flora_classes_first() -> None:
    register()
    first = lora_utils._all_lora_classes
    activate = LoRAModelManager.activate_adapter
    register()
    assert lora_utils._all_lora_classes == first and LoRAModelManager.activate_adapter is activate
    assert first[: len(flora_lora_classes())] == flora_lora_classes()
    assert len(set(first)) == len(first)  # nothing twice
    assert getattr(activate, "__wrapped__", None) is not None  # functools.wraps keeps vLLM's original reachable


@pytest.mark.parametrize(
    ("mode", "graphs", "compiled"),
    [
        (CompilationMode.NONE, CUDAGraphMode.NONE, False),
        (CompilationMode.VLLM_COMPILE, CUDAGraphMode.NONE, True),
        (CompilationMode.NONE, CUDAGraphMode.PIECEWISE, True),
    ],
)
def test_a_compiled_model_is_seen(monkeypatch, mode, graphs, compiled) -> None:
    """FLoRA layers branch on host-side slot state, which torch.compile or a CUDA graph would freeze."""
    config = SimpleNamespace(compilation_config=SimpleNamespace(mode=mode, cudagraph_mode=graphs))
    monkeypatch.setattr("vllm.config.get_current_vllm_config_or_none", lambda: config)
    assert _compiled() is compiled
