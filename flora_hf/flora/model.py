from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..per_example import per_example_forward
from .bnb import is_8bit_linear
from .config import TRANSFORMERS_MODELS_TO_FLORA_TARGET_MODULES_MAPPING, FLoRAConfig
from .layer import FLoRALayer, Linear


class FLoRAModel(BaseTuner):
    """Injects FLoRA layers into a transformers model (the paper: https://arxiv.org/abs/2312.05677).

    Besides PEFT's usual single-active-adapter use, every forward or generate accepts ``adapter_names`` (one per
    example, ``"__base__"`` for none), in training too, so one batch mixes adapters at the base model's cost.

    Example::

        >>> model = get_peft_model(base, FLoRAConfig(r=1), adapter_name="perl")
        >>> model.add_adapter("ruby", FLoRAConfig(r=1))
        >>> model(input_ids, adapter_names=["perl", "ruby"])
    """

    prefix: str = "flora_"
    tuner_layer_cls = FLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_FLORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        flora_config: FLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        kwargs = {
            "r": flora_config.r,
            "init_weights": flora_config.init_weights,
            "init_noise_std": flora_config.init_noise_std,
            "fan_in_fan_out": flora_config.fan_in_fan_out,
        }
        if isinstance(target, FLoRALayer):
            target.update_layer(adapter_name, **kwargs, inference_mode=flora_config.inference_mode)
            return
        new_module = self._create_new_module(flora_config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until made active (PEFT's convention)
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        flora_config: FLoRAConfig, adapter_name: str, target: nn.Module, **kwargs: Any
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if is_8bit_linear(base):
            from .bnb import Linear8bitLt

            kwargs.pop("fan_in_fan_out", None)
            return Linear8bitLt(target, adapter_name, **kwargs)
        if isinstance(base, Conv1D):
            if not kwargs["fan_in_fan_out"]:
                warnings.warn(
                    "fan_in_fan_out is False but the target is a Conv1D; setting fan_in_fan_out=True.", stacklevel=2
                )
                kwargs["fan_in_fan_out"] = flora_config.fan_in_fan_out = True
            return Linear(target, adapter_name, is_target_conv_1d_layer=True, **kwargs)
        if isinstance(base, nn.Linear):
            if kwargs["fan_in_fan_out"]:
                warnings.warn(
                    "fan_in_fan_out is True but the target is nn.Linear; setting fan_in_fan_out=False.", stacklevel=2
                )
                kwargs["fan_in_fan_out"] = flora_config.fan_in_fan_out = False
            return Linear(target, adapter_name, **kwargs)
        raise ValueError(
            f"Target module {type(base).__name__} is not supported by FLoRA: only torch.nn.Linear, "
            "transformers Conv1D and bitsandbytes Linear8bitLt are."
        )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT calls this around forward and generate: ``adapter_names`` selects an adapter per example."""
        with per_example_forward(self.model, args, kwargs):
            yield

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        if getattr(self.model, "is_loaded_in_8bit", False) or getattr(self.model, "is_loaded_in_4bit", False):
            raise ValueError("Cannot merge FLoRA layers when the base model is quantized")
