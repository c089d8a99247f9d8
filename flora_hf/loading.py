"""A base causal LM with its tokenizer, and PEFT adapters loaded onto it by name: the one loader that the server,
the trainers and the evaluators share (each adds only its own hint for a model it cannot read, and its placement).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class ModelLoadError(OSError):
    """The model or its tokenizer could not be read (no such folder, not cached and no network, a broken file)."""


def load_causal_lm(
    model_id: str,
    *,
    dtype: Any = None,
    quantization_config: Any = None,
    device_map: Any = None,
    cache_dir: Optional[str] = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    hint: str = "",
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``model_id`` (a folder or a hub id), both read with the same hub options.

    ``dtype`` None keeps transformers' default (fp32 weights); ``"auto"`` the checkpoint's. A model that cannot be
    read is a :class:`ModelLoadError` whose message ends with ``hint`` (what this caller's user should pass).
    """
    hub = {"cache_dir": cache_dir, "revision": revision, "trust_remote_code": trust_remote_code}
    options = {"dtype": dtype, "quantization_config": quantization_config, "device_map": device_map}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **hub)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, **hub, **{k: v for k, v in options.items() if v is not None}
        )
    except OSError as exc:
        raise ModelLoadError(f"could not load model {model_id!r}: {exc}" + (f"\n{hint}" if hint else "")) from exc
    return model, tokenizer


def load_named_adapters(model: Any, adapters: Mapping[str, Union[str, Path]]) -> Any:
    """``model`` with each PEFT adapter folder loaded under its name (the first wraps it in a ``PeftModel``), in
    eval mode; ``model`` itself when ``adapters`` is empty."""
    if not adapters:
        return model
    (first, path), *rest = adapters.items()
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
    for name, folder in rest:
        peft_model.load_adapter(str(folder), adapter_name=name)
    return peft_model.eval()
