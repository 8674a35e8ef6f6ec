"""Architecture descriptions: the only place that knows a model family's layer topology (see `base.py`).
Adding a family is one description here plus its tests; every pass reads it through `describe`."""
from __future__ import annotations

from .base import ArchDescription, LinearGroup, activation, attention_scale, setting
from .gemma import FAMILIES as _GEMMA
from .llama import FAMILIES as _LLAMA

FAMILIES = _LLAMA + _GEMMA

BY_MODEL_TYPE: dict[str, ArchDescription] = {mt: d for d in FAMILIES for mt in d.model_types}


class UnsupportedArchitecture(ValueError):
    """A model_type no description covers."""


def supported() -> tuple[str, ...]:
    return tuple(BY_MODEL_TYPE)


def describe(config_or_model_type) -> ArchDescription:
    """The description for a config (object or dict) or a model_type string; UnsupportedArchitecture otherwise."""
    mt = config_or_model_type if isinstance(config_or_model_type, str) else setting(config_or_model_type, "model_type")
    try:
        return BY_MODEL_TYPE[mt]
    except KeyError:
        raise UnsupportedArchitecture(f"model_type {mt!r} has no architecture description (described: "
                                      f"{', '.join(BY_MODEL_TYPE)})") from None


__all__ = ["ArchDescription", "LinearGroup", "UnsupportedArchitecture", "activation", "attention_scale", "describe",
           "setting", "supported"]
