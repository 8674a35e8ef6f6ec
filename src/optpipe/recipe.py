"""Typed, validated recipes: YAML -> pydantic models, with errors that name the file and the field path."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """`${VAR}` and `${VAR:-default}` in paths, so a recipe can point at weights that live elsewhere."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ValueError(f"environment variable {name} is not set and has no default")
        return default

    return _ENV.sub(sub, value)


class ModelSpec(Strict):
    source: str = Field(description="builtin:smollm2-135m, a local HF directory, a .gguf file, or a hub id")
    gguf_file: Optional[str] = None
    trust_remote_code: bool = False
    revision: Optional[str] = None
    streaming: bool = Field(False, description="read a local safetensors checkpoint tensor by tensor (models larger "
                                              "than memory): no model in memory, fp32 reference layer by layer")

    @field_validator("source")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_env(v)


class DataSpec(Strict):
    source: str = Field(description="builtin:calibration | builtin:evaluation | a local .txt/.jsonl/.parquet | a hub dataset")
    split: str = "train"
    text_field: str = "text"
    config_name: Optional[str] = None
    max_tokens: int = Field(4096, gt=0, description="tokens taken from the source")
    window: int = Field(512, ge=16, description="tokens per sequence (perplexity window / calibration sample)")

    @field_validator("source")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_env(v)


class AccuracyGate(Strict):
    max_ppl_delta_pct: float = Field(3.0, description="relative perplexity increase vs the fp32 reference, percent")
    max_mean_kl: Optional[float] = Field(None, ge=0, description="mean KL(ref || candidate) of next-token distributions")
    min_top1_agreement: Optional[float] = Field(None, ge=0, le=1)


class SpeedGate(Strict):
    min_decode_speedup: Optional[float] = Field(1.0, gt=0, description="candidate decode tok/s / fp32 eager tok/s")
    min_prefill_speedup: Optional[float] = Field(None, gt=0)
    prompt_tokens: int = Field(64, ge=1)
    new_tokens: int = Field(64, ge=2)
    repeats: int = Field(5, ge=1, le=50)
    threads: Optional[int] = Field(None, ge=1, description="default: physical cores")
    unmeasured: Literal["fail", "allow"] = Field(
        "fail", description="when the target's speed cannot be measured here (no GPU): fail the build, or allow it "
                            "and record the speed gate as not measured")


class Gates(Strict):
    accuracy: AccuracyGate = AccuracyGate()
    speed: SpeedGate = SpeedGate()


class PassSpec(BaseModel):
    """One entry of `passes`: a name, an optional plugin `path`, and the pass's own options (checked by the pass)."""

    model_config = ConfigDict(extra="allow")
    name: str
    path: Optional[str] = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Recipe(Strict):
    name: str
    description: str = ""
    model: ModelSpec
    target: Literal["cpu-onnx", "cpu-torch", "cpu-ipex", "gpu-tensorrt"]
    passes: list[PassSpec]
    calibration: DataSpec = DataSpec(source="builtin:calibration", max_tokens=2048, window=256)
    evaluation: DataSpec = DataSpec(source="builtin:evaluation")
    gates: Gates = Gates()
    output: Optional[str] = None
    seed: int = 0

    # Where the recipe came from; relative paths (plugins, data files) resolve against it.
    source_path: Optional[str] = Field(None, exclude=True)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @field_validator("passes")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("at least one pass is needed (for cpu-onnx: export)")
        return v

    @property
    def base_dir(self) -> Path:
        return Path(self.source_path).resolve().parent if self.source_path else Path.cwd()

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def resolved(self) -> dict:
        """The recipe as built: every default filled in (goes into the manifest)."""
        return self.model_dump(mode="json")


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be")
    return msg.replace("Value error, ", "")


def errors_to_message(source: str, exc: ValidationError, prefix: tuple = ()) -> str:
    lines = [f"{source}: {format_loc(prefix + tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()]
    return "\n".join(lines)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read, parse and fully validate a recipe, including every pass's options and the pass order."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with model, target and passes")
    try:
        recipe = Recipe.model_validate({**data, "source_path": source if source != "<recipe>" else None})
    except ValidationError as e:
        raise RecipeError(errors_to_message(source, e)) from None
    # Deferred import: the pass registry imports this module.
    from .pipeline import validate_pass_chain

    validate_pass_chain(recipe, source)
    return recipe
