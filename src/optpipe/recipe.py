"""Typed, validated recipes: YAML -> pydantic models, with errors that name the file and the field path."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import RecipeError
from .safeio import check_path_text, read_bounded
from .strict import StrictModel

Strict = StrictModel  # the base of every recipe section


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

    out = _ENV.sub(sub, value)
    if not out.strip() and value.strip():
        names = ", ".join(m.group(1) for m in _ENV.finditer(value))
        raise ValueError(f"{value!r} expands to an empty value ({names} unset or empty, and no default): "
                         "set the variable to the path")
    return out


def _path_text(value: str) -> str:
    """A path the operating system can name: not empty, no NUL byte, no component over 255 bytes."""
    if not value.strip():
        raise ValueError("must not be empty")
    try:
        check_path_text(value, "path")
    except RecipeError as e:
        raise ValueError(str(e).removeprefix("path: ")) from None
    return value


EnvStr = Annotated[str, AfterValidator(expand_env), AfterValidator(_path_text)]  # a path or name; may say ${VAR}
PathStr = Annotated[str, AfterValidator(_path_text)]


class ModelSpec(Strict):
    source: EnvStr = Field(description="builtin:smollm2-135m, a local HF directory, a .gguf file, or a hub id")
    gguf_file: Optional[str] = Field(None, pattern=r"^[^/\\]+\.gguf$",
                                     description="the .gguf file inside the directory `source` names (a file name)")
    trust_remote_code: bool = False
    revision: Optional[str] = None
    streaming: bool = Field(False, description="read a local safetensors checkpoint tensor by tensor (models larger "
                                              "than memory): no model in memory, fp32 reference layer by layer")


# Default token budgets. Evaluation: SmolLM2-135M's accuracy gate (fp32 reference + candidate, 12 windows of 512)
# takes about a minute on 2 cores, and the ΔPPL interval is about +-0.5 points wide there (docs/benchmarks.md);
# raise it for a release gate (the built-in text has 12.5k tokens). Calibration: GPTQ's Hessian of a 1,536-wide
# down_proj needs several times its width in tokens (1,100 overfit).
EVALUATION_TOKENS = 6144
CALIBRATION_TOKENS = 8192


class DataSpec(Strict):
    source: EnvStr = Field(description="builtin:calibration | builtin:evaluation | a local .txt/.md/.jsonl/.parquet | a hub dataset")
    split: str = "train"
    text_field: str = "text"
    config_name: Optional[str] = None
    max_tokens: Optional[int] = Field(
        None, ge=16, le=10_000_000, description=f"tokens taken from the source (default: {EVALUATION_TOKENS} for "
                                                f"evaluation, {CALIBRATION_TOKENS} for calibration)")
    window: int = Field(512, ge=16, le=32768, description="tokens per sequence (perplexity window / calibration sample)")


BUILTIN_REFERENCES = ("fp32-eager", "fp32-onnx")
REFERENCE_HELP = ("fp32-eager (the model in PyTorch), fp32-onnx (its plain export on ONNX Runtime: what the graph "
                  "passes changed, without the exporter's own difference) or the path of an emitted artifact (a "
                  "regression gate: the thresholds then bound the change against what is deployed)")


def _reference(v: str) -> str:
    v = expand_env(v.strip())
    if not v:
        raise ValueError(f"must be {' | '.join(BUILTIN_REFERENCES)} | the path of an artifact directory")
    return _path_text(v)


Reference = Annotated[str, AfterValidator(_reference)]


def is_artifact_reference(v: str) -> bool:
    return v not in BUILTIN_REFERENCES


class TaskGate(Strict):
    """One lm-evaluation-harness task the candidate must not do worse on than the reference (gates/tasks.py)."""
    name: str = Field(description="an lm-eval task name (lm-eval's own, or one defined in gates.accuracy.task_paths)")
    max_drop: float = Field(ge=0, description="largest allowed drop of the metric (reference - candidate, in the "
                                              "metric's units: 0.02 = 2 points of accuracy), on the accuracy gate's "
                                              "decide_on statistic")
    metric: Optional[str] = Field(None, description="the task's metric to gate on (default: its first)")
    limit: Optional[int] = Field(None, ge=2, description="documents scored (default: all)")


class AccuracyGate(Strict):
    reference: Reference = Field("fp32-eager", description="what the candidate's next-token distributions are compared "
                                                     "with: " + REFERENCE_HELP)
    max_ppl_delta_pct: float = Field(3.0, ge=0, le=1000,
                                     description="relative perplexity increase vs the fp32 reference, percent")
    decide_on: Literal["upper_95", "point"] = Field(
        "upper_95", description="the statistic max_ppl_delta_pct applies to: the upper end of the 95% interval "
                                "(a pass must not be luck) or the point estimate")
    max_mean_kl: Optional[float] = Field(None, ge=0, description="mean KL(ref || candidate) of next-token distributions")
    max_kl_p99: Optional[float] = Field(None, ge=0, description="99th percentile of the per-token KL")
    min_top1_agreement: Optional[float] = Field(None, ge=0, le=1)
    tasks: list[TaskGate] = Field(default_factory=list, description="lm-evaluation-harness tasks gated on their "
                                                                    "paired drop (needs optpipe[lmeval])")
    task_paths: list[PathStr] = Field(default_factory=list, description="directories of task YAML files (relative: "
                                                                    "beside the recipe); only these are indexed")


class SpeedGate(Strict):
    baseline: Reference = Field("fp32-eager", description="what the candidate's speed is divided by: " + REFERENCE_HELP)
    min_decode_speedup: Optional[float] = Field(1.0, gt=0, le=1000, description="candidate decode tok/s / baseline tok/s")
    min_prefill_speedup: Optional[float] = Field(None, gt=0, le=1000)
    prompt_tokens: int = Field(64, ge=1, le=32768)
    new_tokens: int = Field(64, ge=2, le=4096)
    repeats: int = Field(5, ge=1, le=50, description="rounds measured before the interval may decide")
    max_repeats: Optional[int] = Field(
        None, ge=1, le=200, description="bound on rounds (busy ones included) before the gate says inconclusive; "
                                        "default max(3 x repeats, 10)")
    decide_on: Literal["lower_95", "point"] = Field(
        "lower_95", description="lower_95: the speedup's 95% interval must clear the threshold (and a fail needs "
                                "its upper bound below it); point: the geometric mean of the rounds decides")
    max_background_cpus: float = Field(
        0.25, ge=0, le=1024, description="CPUs other processes may keep busy, beyond those the gate's threads leave "
                                         "idle, before a round is discarded as measuring the machine's load")
    threads: Optional[int] = Field(None, ge=1, le=1024, description="default: physical cores")
    unmeasured: Literal["fail", "allow"] = Field(
        "fail", description="when the target's speed cannot be measured here (no GPU): fail the build, or allow it "
                            "and record the speed gate as not measured")

    @model_validator(mode="after")
    def _bound(self):
        if self.max_repeats is None:
            self.max_repeats = max(3 * self.repeats, 10)
        elif self.max_repeats < self.repeats:
            raise ValueError(f"max_repeats ({self.max_repeats}) must be >= repeats ({self.repeats})")
        return self


class CoverageGate(Strict):
    min_quantized_fraction: Optional[float] = Field(
        None, ge=0, le=1, description="fraction of the artifact's linears that must run quantized (default: only the "
                                      "floor: every quantize pass of the recipe quantized at least one layer)")


class GenerationGate(Strict):
    """Free-running generation vs the reference's, from prompts cut out of the evaluation text."""
    prompts: int = Field(4, ge=0, le=256, description="prompts (0 switches the gate off)")
    prompt_tokens: int = Field(32, ge=1, le=32768)
    new_tokens: int = Field(32, ge=2, le=4096)
    min_teacher_forced_agreement: Optional[float] = Field(
        None, ge=0, le=1, description="fraction of the reference's continuation the candidate predicts as its top-1 "
                                      "when fed the reference's tokens")
    min_mean_first_divergence: Optional[float] = Field(
        None, ge=0, description="mean position (tokens) where the greedy continuations first differ")
    max_repetition_increase: Optional[float] = Field(
        0.25, ge=0, le=1, description="degenerate output: the candidate's repeated-4-gram fraction may exceed the "
                                      "reference's by at most this much")
    max_length_change: Optional[float] = Field(
        0.5, ge=0, description="degenerate output: total generated length (to EOS) within this fraction of the "
                               "reference's")


class RegressionGate(Strict):
    """Tolerances of `optpipe gate NEW --against DEPLOYED`: the new artifact against the one it replaces."""
    max_ppl_delta_pct: float = Field(
        1.0, ge=0, le=1000, description="perplexity increase against the deployed artifact, percent (decided on the "
                                        "accuracy gate's statistic, upper_95 by default)")
    max_decode_slowdown_pct: float = Field(
        5.0, ge=0, lt=100, description="decode slowdown against the deployed artifact, percent (decided on the speed "
                                       "gate's statistic, lower_95 by default)")


class Gates(Strict):
    accuracy: AccuracyGate = AccuracyGate()
    speed: SpeedGate = SpeedGate()
    coverage: CoverageGate = CoverageGate()
    generation: GenerationGate = GenerationGate()
    regression: RegressionGate = RegressionGate()


SEARCH_PATH = re.compile(r"^passes\[(\d+)\](?:\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?$")
OBJECTIVES = {"decode_tok_s": "decode speed (the speed gate's decode speedup over its baseline)",
              "prefill_ms": "prefill time (the speed gate's prefill speedup over its baseline)",
              "size": "artifact bytes"}


class SensitivitySearch(Strict):
    """Mixed precision chosen by measurement: candidates keep the N most sensitive (layer, projection) groups at
    INT8 (the INT4 pass's `int8.include`), the groups ranked once by the KL of each alone quantized."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    pass_index: int = Field(alias="pass", ge=0, description="index of the quantize-int4 pass whose int8.include is set")
    keep_int8: list[int] = Field(description="candidate values of N (0: that pass as written)")
    block_size: Optional[int] = Field(None, description="scheme the ranking is measured with (default: the pass's)")
    zero_point: Optional[Literal["float", "int", "symmetric"]] = None
    tokens: int = Field(1024, ge=64, le=65536, description="calibration tokens scored per group")

    @field_validator("keep_int8")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if not v or any(n < 0 for n in v) or len(set(v)) != len(v):
            raise ValueError("give distinct counts >= 0, e.g. [0, 4, 8]")
        return v


class SearchSpec(Strict):
    """`optpipe tune`: pass options to vary, what to optimize, and how hard to look. The gates are the constraints."""
    space: dict[str, list[Any]] = Field(
        default_factory=dict, description="'passes[I].OPTION' (or 'passes[I].OPTION.FIELD', or 'passes[I].enabled' to try without the "
                    "pass) -> candidate values; candidates are every combination")
    objective: Literal["decode_tok_s", "prefill_ms", "size"] = Field(
        "decode_tok_s", description="what the winner is best at among candidates that pass every gate")
    screen_windows: int = Field(2, ge=1, le=64, description="evaluation windows scored first: a candidate whose "
                                                              "ΔPPL is over the gate on them with 95% confidence is "
                                                              "dropped before the full gates")
    max_candidates: int = Field(512, ge=1, le=100_000, description="refuse a space with more combinations")
    budget_minutes: Optional[float] = Field(None, gt=0, description="stop starting candidates after this long")
    budget_candidates: Optional[int] = Field(None, ge=1, description="evaluate at most this many candidates")
    sensitivity: Optional[SensitivitySearch] = None

    @model_validator(mode="after")
    def _something_to_vary(self):
        if not self.space and self.sensitivity is None:
            raise ValueError("name at least one option to vary (space) or a sensitivity search")
        return self

    @field_validator("space")
    @classmethod
    def _paths(cls, v: dict) -> dict:
        for path, values in v.items():
            if not SEARCH_PATH.match(path):
                raise ValueError(f"{path!r}: a search path is passes[I].OPTION (e.g. passes[3].block_size)")
            if not values:
                raise ValueError(f"{path!r}: give at least one value")
            seen = [repr(x) for x in values]
            if len(set(seen)) != len(seen):
                raise ValueError(f"{path!r}: a value is given twice")
        return v


class PassSpec(BaseModel):
    """One entry of `passes`: a name, an optional plugin `path`, and the pass's own options (checked by the pass)."""

    model_config = ConfigDict(extra="allow")
    name: str
    path: Optional[PathStr] = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Recipe(Strict):
    name: str
    description: str = ""
    model: ModelSpec
    target: Literal["cpu-onnx", "cpu-torch", "cpu-ipex", "gpu-tensorrt"]
    passes: list[PassSpec]
    calibration: DataSpec = DataSpec(source="builtin:calibration", window=256)
    evaluation: DataSpec = DataSpec(source="builtin:evaluation")
    gates: Gates = Gates()
    output: Optional[PathStr] = None
    seed: int = Field(0, ge=0, le=2 ** 32 - 1, description="seeds numpy, torch and the samplers (a 32-bit value)")
    search: Optional[SearchSpec] = Field(None, description="`optpipe tune` only: options to vary (build ignores it)")

    # Where the recipe came from; relative paths (plugins, data files) resolve against it.
    source_path: Optional[str] = Field(None, exclude=True)
    _passes: Optional[list] = PrivateAttr(None)  # the validated pass chain (pipeline.validate_pass_chain)

    @model_validator(mode="after")
    def _token_budgets(self):
        for spec, default in ((self.calibration, CALIBRATION_TOKENS), (self.evaluation, EVALUATION_TOKENS)):
            if spec.max_tokens is None:
                spec.max_tokens = default
        return self

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


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: standard YAML, expanded by SafeLoader;
                continue                                   # the mapping's own keys may override what it merges
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"a key must be a plain value (a name), not a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_NODES = 100_000  # a recipe is a few hundred values; more means an alias bomb or a wrong file


def _expanded_size(obj, memo: dict) -> int:
    """Values the document expands to (aliases counted every time they are used), memoized per object."""
    key = id(obj)
    if key in memo:
        return memo[key]
    memo[key] = MAX_NODES + 1  # a cycle (a self-referencing alias) counts as too large
    if isinstance(obj, dict):
        n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in obj.items())
    elif isinstance(obj, list):
        n = 1 + sum(_expanded_size(v, memo) for v in obj)
    else:
        n = 1
    memo[key] = min(n, MAX_NODES + 1)
    return memo[key]


def parse_yaml(text: str, source: str) -> Any:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply") from None
    try:
        too_large = _expanded_size(data, {}) > MAX_NODES
    except RecursionError:
        too_large = True
    if too_large:
        raise RecipeError(f"{source}: expands to more than {MAX_NODES} values (alias bomb or not a recipe)")
    return data


def load_recipe(path: str | os.PathLike, allow_plugins: bool | None = None) -> Recipe:
    """Read, parse and fully validate a recipe, including every pass's options and the pass order."""
    path = check_path_text(path, "recipe")
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, not a recipe file (give the recipe's .yaml file)")
    if not os.path.lexists(path):
        raise RecipeError(f"{path}: no such recipe file")
    raw = read_bounded(path, 1 << 20, str(path), RecipeError, "recipe (a YAML file of at most 1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); save it as UTF-8") from None
    return recipe_from_dict(parse_yaml(text, str(path)), source=str(path), allow_plugins=allow_plugins)


def recipe_from_dict(data: Any, source: str = "<recipe>", allow_plugins: bool | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with model, target and passes")
    try:
        recipe = Recipe.model_validate({**data, "source_path": source if source != "<recipe>" else None})
    except ValidationError as e:
        raise RecipeError(errors_to_message(source, e)) from None
    # Deferred import: the pass registry imports this module.
    from .pipeline import validate_pass_chain

    _anchor_model_path(recipe)
    validate_pass_chain(recipe, source, allow_plugins)
    return recipe


def _anchor_model_path(recipe: Recipe) -> None:
    """A relative model path is read next to the recipe when it exists there (as data and plugin paths are),
    else from the working directory; the manifest then records the absolute path that was used."""
    src = recipe.model.source
    if src.startswith("builtin:") or Path(src).expanduser().is_absolute() or not recipe.source_path:
        return
    beside = recipe.base_dir / src
    if beside.exists():
        recipe.model.source = str(beside)
