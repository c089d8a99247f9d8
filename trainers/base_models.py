"""Loading a recipe's base model: a hub id, a local folder, or one of the tiny offline models.

Development machines have no hub access, so a hub id that is neither cached nor reachable must fail at once with
the fix (``MODEL=path/to/folder``), not after a minute of retries. 8-bit loading through bitsandbytes (the paper's
setting) happens only where CUDA is present; elsewhere the recipe says so and loads in full precision.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .recipe import Recipe

logger = logging.getLogger(__name__)

TINY_MODELS = ("tiny-code", "tiny-whisper")
"""Model names built locally (and cached) instead of loaded from the hub."""


class ModelUnavailable(RuntimeError):
    """The base model can be neither found locally nor downloaded; the message says how to pass a local one."""


@dataclass
class LoadedBase:
    """A base model with what its data pipeline needs (tokenizer; feature extractor for speech)."""

    model: Any
    tokenizer: Any
    feature_extractor: Any = None
    source: str = ""
    quantized: bool = False


# ------------------------------------------------------------------------------------------------ availability
def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the hub answers within ``timeout_s`` (any HTTP answer counts; a refused or hanging connection not)."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # 401 without a token: the hub is there
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_cached(model_id: str) -> bool:
    """Whether ``model_id``'s config is in the local hub cache (then it loads without network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # an invalid repo id
        return False
    return isinstance(found, str)


def model_problem(model: str, reachable: Optional[Callable[[], bool]] = None) -> Optional[str]:
    """None if ``model`` can be loaded here, else why not and what to pass instead. ``reachable`` (default
    :func:`hub_reachable`) is asked only when the model is neither local nor cached."""
    if not model:
        return "no model given: pass MODEL=hub-id or MODEL=path/to/folder"
    if model in TINY_MODELS or Path(model).expanduser().is_dir():
        return None
    folder = Path(model).expanduser().absolute()
    # "org/name" is a hub id unless its first part is a local folder ("models/tiny-code" with models/ here)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    looks_like_path = looks_like_path or ("/" in model and folder.parent.is_dir())
    if looks_like_path:
        return f"model folder {model} does not exist (no folder {folder})"
    if is_cached(model):
        return None
    if (reachable or hub_reachable)():
        return None
    why = "the hub is switched off (HF_HUB_OFFLINE is set)" if hub_offline() else "the Hugging Face hub is unreachable"
    return (
        f"cannot load model {model!r}: there is no folder {folder}, and as a hub id it is not in the local cache "
        f"and {why}. Pass a local copy instead: "
        f"MODEL=path/to/folder (flora-train --model path/to/folder), a folder written by save_pretrained or by "
        f"`hf download {model} --local-dir path/to/folder` on a machine with network"
    )


# -------------------------------------------------------------------------------------------------- loading
def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def use_8bit(recipe: Recipe) -> bool:
    """8-bit base only with CUDA and bitsandbytes, and not under DeepSpeed (ZeRO cannot shard int8 weights)."""
    if not recipe.load_in_8bit:
        return False
    if not torch.cuda.is_available():
        logger.warning("load_in_8bit needs CUDA; loading the base model in full precision on this machine")
        return False
    if recipe.deepspeed:
        logger.warning("DeepSpeed does not shard 8-bit (bitsandbytes) weights; loading the base model unquantized")
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelUnavailable("load_in_8bit needs bitsandbytes: pip install 'flora-hf[bnb]'") from err
    return True


def torch_dtype(recipe: Recipe) -> Optional[torch.dtype]:
    """Half precision weights on GPUs for unquantized bases (the adapters stay in fp32); fp32 on CPU."""
    if not torch.cuda.is_available() or recipe.precision == "fp32":
        return None
    if recipe.precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _pretrained_kwargs(recipe: Recipe) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if use_8bit(recipe):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": local_rank()}
    dtype = torch_dtype(recipe)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return kwargs


def _check(model: str) -> None:
    problem = model_problem(model)
    if problem is not None:
        raise ModelUnavailable(problem)


def load_code_base(recipe: Recipe, progress: bool = True) -> LoadedBase:
    """A causal LM and its tokenizer (pad token = EOS where the tokenizer has none, as StarCoder's)."""
    if recipe.model == "tiny-code":
        from .recipe_data import builtin_code_corpus
        from .tiny_code_model import TinyCodeModelSpec, load_or_build_tiny_code_model

        spec = TinyCodeModelSpec(seed=recipe.seed)
        model, tokenizer, info = load_or_build_tiny_code_model(
            spec=spec, corpus=builtin_code_corpus(recipe.seed), progress=progress
        )
        return LoadedBase(model, tokenizer, source=str(model.name_or_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check(recipe.model)
    kwargs = _pretrained_kwargs(recipe)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(recipe.model, **kwargs)
    return LoadedBase(model, tokenizer, source=recipe.model, quantized="quantization_config" in kwargs)


def load_speech_base(recipe: Recipe, progress: bool = True) -> LoadedBase:
    """A Whisper model with its tokenizer and feature extractor."""
    if recipe.model == "tiny-whisper":
        from .tiny_whisper_model import TinyWhisperSpec, load_or_build_tiny_whisper

        built = load_or_build_tiny_whisper(spec=TinyWhisperSpec(seed=recipe.seed), progress=progress)
        return LoadedBase(built.model, built.tokenizer, built.feature_extractor, source=str(built.folder))
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    _check(recipe.model)
    kwargs = _pretrained_kwargs(recipe)
    tokenizer = WhisperTokenizer.from_pretrained(recipe.model)
    features = WhisperFeatureExtractor.from_pretrained(recipe.model)
    model = WhisperForConditionalGeneration.from_pretrained(recipe.model, **kwargs)
    return LoadedBase(model, tokenizer, features, source=recipe.model, quantized="quantization_config" in kwargs)


def load_base(recipe: Recipe, progress: bool = True) -> LoadedBase:
    """The recipe's base model, tokenizer (and feature extractor), ready for adapters."""
    loaded = load_code_base(recipe, progress) if recipe.task == "code" else load_speech_base(recipe, progress)
    if loaded.quantized:
        from peft import prepare_model_for_kbit_training

        loaded.model = prepare_model_for_kbit_training(
            loaded.model,
            use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    loaded.model.config.use_cache = False  # no KV cache in training (and it conflicts with checkpointing)
    return loaded
