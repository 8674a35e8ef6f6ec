"""The base of every model a recipe's values are validated by (the recipe's sections and every pass's options):
unknown keys, NaN/inf and booleans given for numbers are refused, each with the field's name."""
from __future__ import annotations

from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, field_validator


def _mentions(annotation, types: tuple) -> bool:
    """`annotation` is one of `types`, also inside Optional/Annotated/Union, or a Literal of such values."""
    if annotation in types:
        return True
    if get_origin(annotation) is Literal:
        return any(type(a) in types for a in get_args(annotation))
    return any(_mentions(a, types) for a in get_args(annotation) if isinstance(a, type) or get_args(a))


class StrictModel(BaseModel):
    # NaN/inf are never a valid setting: a `.nan` threshold would switch a gate off.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value, info):
        """`repeats: true` is a typo, not 1 (pydantic takes a boolean as a number)."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            if _mentions(annotation, (int, float)) and not _mentions(annotation, (bool,)):
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value
