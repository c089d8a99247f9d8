"""Config fields every flora-hf method shares with PEFT's layer tuners (which layers to adapt, what else to save)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig


@dataclass
class LayerTunerConfig(PeftConfig):
    """PEFT's layer-selection fields, validated the same way for FLoRA and MiLoRA (``target_modules`` is per method)."""

    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave untouched even if targeted."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True when the layer stores its weight as (fan_in, fan_out), like GPT-2's Conv1D. Set "
            "automatically from the layer type."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapter layers to train and save, e.g. a new classification head."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer list used with `layers_to_transform`, e.g. 'layers' or 'h'."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(getattr(self, "target_modules", None), list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only makes sense together with `layers_to_transform`")
