"""Pass manager: runs passes in order over a ModelState and records each run (name, options, seconds, changes).

Style after onnx-ir's passes: a pass is a class with one `call` that returns a result saying whether it
modified the model. Each pass has a typed config (pydantic, unknown keys forbidden), declares the stage it
works on (`torch`: the HF model in memory; `onnx`: an ONNX graph), what it needs (e.g. calibration data)
and what it provides for later passes (e.g. `fused-attention`).
"""
from __future__ import annotations

import importlib.util
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, ValidationError, model_validator

from .errors import BuildError, RecipeError
from .handoff import Handoff
from .safeio import env_flag
from .strict import StrictModel


class PassConfig(StrictModel):
    # old option name -> new one: an old recipe is refused with an error that names the field to write instead
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed(cls, data):
        if isinstance(data, dict):
            for old, new in cls.renamed.items():
                if old in data:
                    raise ValueError(f"option `{old}` is now `{new}` (one name per idea across targets): "
                                     f"write `{new}: {data[old]}`")
        return data


def _compiled(patterns: list[str]) -> list[str]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"invalid regex {p!r}: {e}") from None
    return patterns


Patterns = Annotated[list[str], AfterValidator(_compiled)]


@dataclass
class PassResult:
    modified: bool
    changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    changes: dict[str, Any]
    notes: list[str]

    def to_json(self) -> dict:
        return {"name": self.name, "options": self.options, "seconds": round(self.seconds, 3),
                "modified": self.modified, "changes": self.changes, "notes": self.notes}


@dataclass
class ModelState:
    """What flows through the passes. `stage` says which representation is current."""

    stage: str  # "torch" | "onnx"
    torch_model: Any = None  # transformers PreTrainedModel
    tokenizer: Any = None
    onnx_model: Any = None  # onnx.ModelProto
    checkpoint: Any = None  # LazyCheckpoint: the streaming build (no torch_model in memory)
    features: set[str] = field(default_factory=set)  # provided by passes so far
    handoff: Handoff = field(default_factory=Handoff)  # what the passes leave for the target (typed)
    # streaming build: MatMul name -> loader of its weight W [N, K] as the graph now computes it (dequantized), so a
    # later layer-by-layer calibration sees the model the earlier passes made, as an in-memory graph run would
    effective_weights: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the model: data, threads, a scratch directory."""

    calibration: Any = None  # callable returning a list of token-id arrays (loaded once, on first use)
    threads: int = 1
    workdir: Path | None = None
    seed: int = 0
    scratch: Path | None = None  # kept until the target has saved the artifact, then removed by the builder

    def scratch_dir(self, name: str) -> Path:
        """A fresh directory for tensors a pass computes now and the target writes later (e.g. streaming GPTQ)."""
        import tempfile

        if self.scratch is None:
            raise BuildError("this pass needs a scratch directory (PassContext.scratch), which was not given")
        Path(self.scratch).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch))

    def calibration_windows(self):
        if self.calibration is None:
            raise BuildError("this pass needs calibration data, but none is configured")
        return self.calibration()


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    input_stage: ClassVar[str] = "onnx"
    output_stage: ClassVar[str] = "onnx"
    needs: ClassVar[frozenset[str]] = frozenset()  # "calibration"
    requires: ClassVar[frozenset[str]] = frozenset()  # features an earlier pass must provide
    provides: ClassVar[frozenset[str]] = frozenset()
    targets: ClassVar[frozenset[str] | None] = None  # None: any target
    streams: ClassVar[bool] = False  # works in a streaming build (model.streaming: no model in memory)
    once: ClassVar[bool] = False  # may appear at most once in a recipe (e.g. export, static-kv-cache)
    topology: ClassVar[bool] = False  # reads the layer topology: the model's family needs an architecture description

    def __init_subclass__(cls, **kwargs):
        """A built-in pass registers itself by being defined (nothing to forget); plugins come by entry point or
        `path:`, and a subclass defined elsewhere (a test, a plugin file) is not registered by existing."""
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls) and cls.__module__.startswith(f"{__package__}.passes."):
            _register(cls)

    def __init__(self, config: PassConfig):
        self.config = config

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_machine(self, facts=None) -> None:
        """Raise RecipeError when this CPU cannot build the pass as configured (run before the model loads;
        `facts`: the model's shape from its config or GGUF header, None where it could not be read)."""

    def check_recipe(self, recipe, facts, earlier: list[Pass]) -> None:
        """Raise ValueError when the pass's options do not fit the recipe or the model (`facts`: config read
        without weights). Run by `validate` and before a build loads anything; the caller names the pass."""


class TorchPass(Pass):
    """A pass that edits the PyTorch model in place (before export, or for the cpu-torch / cpu-ipex targets)."""
    input_stage: ClassVar[str] = "torch"
    output_stage: ClassVar[str] = "torch"


class OnnxQuantizePass(Pass):
    """A pass that replaces an exported graph's weights by a quantized form."""
    requires: ClassVar[frozenset[str]] = frozenset({"onnx"})
    provides: ClassVar[frozenset[str]] = frozenset({"quantized"})


class OrtQuantizePass(OnnxQuantizePass):
    """A cpu-onnx weight quantizer (ONNX Runtime's contrib kernels); each works in a streaming build."""
    targets: ClassVar[frozenset[str] | None] = frozenset({"cpu-onnx"})
    streams: ClassVar[bool] = True


_REGISTRY: dict[str, list[type[Pass]]] = {}


def calibrated_when(**options) -> property:
    """`needs = calibrated_when(algorithm="gptq")`: the pass needs calibration data when its options say so."""
    def needs(self) -> frozenset[str]:
        return frozenset({"calibration"}) if all(getattr(self.config, k) == v for k, v in options.items()) else frozenset()
    return property(needs)


def _register(cls: type[Pass]) -> None:
    """One name may have one implementation per target (e.g. `quantize-int4` for cpu-onnx and cpu-torch)."""
    if cls not in _REGISTRY.setdefault(cls.name, []):
        _REGISTRY[cls.name].append(cls)


ENTRY_POINT_GROUP = "optpipe.passes"
PLUGIN_ENV = "OPTPIPE_ALLOW_PLUGINS"


def registered_passes() -> dict[str, list[type[Pass]]]:
    """Built-in passes (every module of optpipe.passes) and passes installed under the `optpipe.passes` entry point."""
    from . import passes  # noqa: F401 - importing registers the built-in passes

    _load_entry_points()
    return {name: list(impls) for name, impls in _REGISTRY.items()}


_ENTRY_POINTS_LOADED: list[bool] = []


def _load_entry_points() -> None:
    """Installed packages register passes by entry point; installing a package is the user's explicit choice."""
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED.append(True)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken installed plugin must not break every build
            raise RecipeError(f"entry point {ep.name} ({ep.value}) of group {ENTRY_POINT_GROUP} failed to import: "
                              f"{type(e).__name__}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise RecipeError(f"entry point {ep.name} ({ep.value}) is not a Pass subclass")
        _register(cls)


def describe_passes() -> dict[str, list[dict]]:
    """Every pass with its implementations (per target) and options: `optpipe passes`, generated from the configs."""
    out = {}
    for name, impls in sorted(registered_passes().items()):
        out[name] = [{
            "targets": sorted(cls.targets) if cls.targets is not None else ["any"],
            "stage": f"{cls.input_stage} -> {cls.output_stage}",
            "summary": (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
            "needs": sorted(cls.needs) if isinstance(cls.needs, frozenset) else ["depends on options"],
            "options": [{"name": f, "type": _type_name(info.annotation),
                         "default": None if info.is_required() else info.get_default(call_default_factory=True),
                         "required": info.is_required(), "description": info.description or ""}
                        for f, info in cls.Config.model_fields.items()],
        } for cls in impls]
    return out


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "")


def plugins_allowed(allow: bool | None) -> bool:
    """The opt-in for code a recipe names: the caller's choice, else OPTPIPE_ALLOW_PLUGINS (1/true/yes/on allow,
    0/false/no/off/empty refuse; any other value is refused as an error naming the variable)."""
    return allow if allow is not None else env_flag(PLUGIN_ENV)


def check_remote_code(recipe, source: str, allow: bool | None) -> None:
    """`model.trust_remote_code: true` makes transformers import the model repository's own Python (its config's
    auto_map): plugin code, so it takes the plugins' opt-in."""
    if recipe.model.trust_remote_code and not plugins_allowed(allow):
        raise RecipeError(f"{source}: model.trust_remote_code: true runs the model repository's own Python code "
                          "(its config's auto_map), which is not run unless allowed: pass --allow-plugins (API: "
                          f"allow_plugins=True) or set {PLUGIN_ENV}=1")


def pass_for_target(impls: list[type[Pass]], target: str) -> type[Pass]:
    """The implementation made for `target`, else one for any target, else the first (validation then says why)."""
    for cls in impls:
        if cls.targets is not None and target in cls.targets:
            return cls
    return next((cls for cls in impls if cls.targets is None), impls[0])


def load_plugin(path: Path, name: str, where: str, allow: bool | None) -> type[Pass]:
    """An out-of-tree pass: a Python file defining a Pass subclass whose `name` matches the recipe entry.
    A recipe is data, so its code runs only when the user allows it (--allow-plugins / OPTPIPE_ALLOW_PLUGINS=1)."""
    if not path.is_file():
        raise RecipeError(f"{where}.path: plugin file {path} not found")
    if not plugins_allowed(allow):
        raise RecipeError(f"{where}.path: {path} is plugin code, which is not run unless allowed: pass "
                          f"--allow-plugins (API: allow_plugins=True) or set {PLUGIN_ENV}=1")
    spec = importlib.util.spec_from_file_location(f"optpipe_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - report any plugin import failure as a recipe problem
        raise RecipeError(f"{where}.path: plugin file {path} failed to import: {type(e).__name__}: {e}") from None
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Pass) and obj is not Pass and getattr(obj, "name", None) == name:
            return obj
    raise RecipeError(f"{where}.path: plugin file {path} defines no Pass subclass with name = {name!r}")


def instantiate(recipe, source: str, allow_plugins: bool | None = None) -> list[Pass]:
    from .recipe import errors_to_message

    known = registered_passes()
    out = []
    for i, spec in enumerate(recipe.passes):
        where = f"{source}: passes[{i}]"
        if spec.path:
            cls = load_plugin(recipe.resolve_path(spec.path), spec.name, where, allow_plugins)
        elif spec.name in known:
            cls = pass_for_target(known[spec.name], recipe.target)
        else:
            raise RecipeError(f"{where}.name: unknown pass {spec.name!r}; known: {', '.join(sorted(known))} "
                      "(or give `path:` to a plugin file)")
        try:
            config = cls.Config.model_validate(spec.options)
        except ValidationError as e:
            raise RecipeError(errors_to_message(source, e, prefix=("passes", i))) from None
        out.append(cls(config))
    return out


def validate_pass_chain(recipe, source: str, allow_plugins: bool | None = None) -> list[Pass]:
    """Check stages, requirements and target fit before anything heavy runs. The instantiated passes are kept
    on the recipe, so a build validates (and imports plugins) once."""
    cached = getattr(recipe, "_passes", None)
    if cached is not None:
        return cached
    passes = instantiate(recipe, source, allow_plugins)
    from .targets import get_target

    target = get_target(recipe.target)
    stage, features = "torch", set()
    for i, p in enumerate(passes):
        where = f"{source}: passes[{i}] ({p.name})"
        if recipe.model.streaming and not p.streams:
            able = sorted({c.name for impls in _REGISTRY.values() for c in impls if c.streams})
            raise RecipeError(f"{where}: not available with model.streaming (it needs the whole model in memory); "
                              f"streaming runs {', '.join(able)}")
        if p.targets is not None and recipe.target not in p.targets:
            raise RecipeError(f"{where}: not available for target {recipe.target} (works for {', '.join(sorted(p.targets))})")
        if p.once and any(type(q).name == p.name for q in passes[:i]):
            raise RecipeError(f"{where}: given twice; it may appear once in a recipe")
        if p.input_stage != stage:
            hint = " (put it before `export`)" if p.input_stage == "torch" else " (add `export` before it)"
            raise RecipeError(f"{where}: works on the {p.input_stage} model, but the model is {stage} here{hint}")
        missing = p.requires - features
        if missing:
            raise RecipeError(f"{where}: needs an earlier pass providing {', '.join(sorted(missing))}")
        stage = p.output_stage
        features |= set(p.provides)
    if stage != target.final_stage:
        raise RecipeError(f"{source}: passes: target {recipe.target} needs a {target.final_stage} model at the end, "
                          f"the passes leave a {stage} model")
    recipe._passes = passes
    return passes


def check_cache_length(n: int, recipe, limit: int | None, limit_name: str, what: str = "max_length") -> None:
    """A static KV cache (or a graph's positions: `what`) must hold the evaluation window and the speed and generation
    gates' prompt + new tokens, and no more positions than the model (or its exported rotary table) has."""
    if limit and n > limit:
        raise ValueError(f"max_length {n} exceeds {limit_name} ({limit})")
    need = {"evaluation.window": recipe.evaluation.window,
            "gates.speed.prompt_tokens + new_tokens": recipe.gates.speed.prompt_tokens + recipe.gates.speed.new_tokens}
    if recipe.gates.generation.prompts:
        need["gates.generation.prompt_tokens + new_tokens"] = (recipe.gates.generation.prompt_tokens
                                                               + recipe.gates.generation.new_tokens)
    for field_, k in need.items():
        if k > n:
            raise ValueError(f"{what} {n} is shorter than {field_} ({k})")


def check_machine(passes: list[Pass], source: str, facts=None) -> None:
    """ISA-dependent refusals, before anything heavy runs (exit 2, naming the pass)."""
    for i, p in enumerate(passes):
        try:
            p.check_machine(facts)
        except RecipeError as e:
            raise RecipeError(f"{source}: passes[{i}] ({p.name}): {e}") from None


def run_passes(passes: list[Pass], state: ModelState, ctx: PassContext, log=print, *, first: int = 0,
               total: int | None = None, after=None) -> list[PassRecord]:
    """Run `passes` in order on `state`. `first`/`total`: their place in a longer chain whose earlier passes already
    ran (tune resumes from a shared prefix); `after(i, state, records)` is called after each pass."""
    records = []
    total = total or first + len(passes)
    for i, p in enumerate(passes, first):
        log(f"[{i + 1}/{total}] {p.name} ...")
        t0 = time.perf_counter()
        try:
            result = p.call(state, ctx)
        except BuildError as e:  # keeps what the pass chained (-v shows it)
            raise BuildError(f"pass {p.name} (passes[{i}]): {e}") from e.__cause__
        except Exception as e:  # noqa: BLE001 - a pass crash names the pass, keeps the traceback chained
            raise BuildError(f"pass {p.name} (passes[{i}]) failed: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - t0
        state.stage = p.output_stage
        state.features |= set(p.provides)
        rec = PassRecord(p.name, p.config.model_dump(mode="json"), seconds, result.modified, result.changes, result.notes)
        records.append(rec)
        summary = ", ".join(f"{k}={v}" for k, v in result.changes.items() if not isinstance(v, (dict, list)))
        log(f"    done in {seconds:.1f}s{': ' + summary if summary else ''}")
        if after is not None:
            after(i, state, records)
    return records
