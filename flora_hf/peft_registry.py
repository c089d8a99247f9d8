"""Teach PEFT about methods that live outside its source tree.

PEFT's ``register_peft_method`` requires the name to already be a member of its ``PeftType`` enum, and Python enums
cannot be extended through a public API, so the member is added the way ``enum`` itself builds members. Everything
else (config, tuner and prefix maps) goes through PEFT's own registration function.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, creating the member if this PEFT version does not have it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__init__(name)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> None:
    """Register ``name`` (lower case) with PEFT once; importing twice is harmless."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = add_peft_type(name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)
