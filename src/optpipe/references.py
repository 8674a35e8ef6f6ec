"""What the gates compare a candidate with: `gates.accuracy.reference`, `gates.speed.baseline`, `gate --against`.

- `fp32-eager`: the model in PyTorch (layer by layer from the checkpoint when the build streams);
- `fp32-onnx`: the model's plain export run by ONNX Runtime, so a gate measures what the graph passes changed
  without the exporter's and runtime's own difference (and the speed gate divides by a baseline users would
  otherwise deploy);
- the path of an emitted artifact: a regression gate against what is deployed.

One place builds these runners; a gate only ever receives a runner.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import artifact
from .errors import ArtifactError, RecipeError
from .recipe import Recipe, is_artifact_reference, recipe_from_dict
from .runtime.loaded import load_tokenizer, runner_for

FIELDS = (("accuracy", "reference"), ("speed", "baseline"))


def _setting(recipe: Recipe, gate: str, key: str) -> str:
    return getattr(getattr(recipe.gates, gate), key)


def artifact_path(recipe: Recipe, value: str) -> Path:
    return recipe.resolve_path(value).resolve()


def check_artifact(path: Path, where: str, vocab_size: int | None = None) -> dict:
    """The manifest of a deployed artifact a gate may compare with: intact (every file as recorded), passed, and
    built for the same vocabulary. Anything else is a RecipeError naming the field."""
    if not path.is_dir():
        raise RecipeError(f"{where}: {path} is not a directory (give fp32-eager, fp32-onnx or an artifact directory)")
    try:
        problems = artifact.verify(path)
    except ArtifactError as e:  # no or malformed manifest
        raise RecipeError(f"{where}: {path}: {e}") from None
    if problems:
        raise RecipeError(f"{where}: {path} cannot be trusted as a baseline: {'; '.join(problems[:3])}")
    manifest = artifact.read_manifest(path)
    if not isinstance((manifest.get("recipe") or {}).get("target"), str) or not isinstance(manifest.get("target"), dict):
        raise RecipeError(f"{where}: {path}'s manifest records no recipe target (not an artifact optpipe can run)")
    theirs = (manifest.get("model") or {}).get("vocab_size")
    if vocab_size and theirs and int(theirs) != int(vocab_size):
        raise RecipeError(f"{where}: {path} was built from a model with a {theirs}-token vocabulary, this one has "
                          f"{vocab_size}: their next-token distributions cannot be compared")
    return manifest


def check_tokenizers(recipe: Recipe, tokenizer, source: str, where: str | None = None) -> None:
    """Every artifact the gates compare with gives each token the id this model's tokenizer does. `check_artifact`
    compares vocabulary sizes without loading anything; two vocabularies of one size can still differ (Llama 2's
    and Mistral's both have 32,000 tokens), and then the same ids are other text: nothing per token compares."""
    if tokenizer is None:
        return
    seen: set[str] = set()
    for gate, key in FIELDS:
        value = _setting(recipe, gate, key)
        if value in seen or not is_artifact_reference(value):  # `--against` names one artifact for both gates
            continue
        seen.add(value)
        path = artifact_path(recipe, value)
        try:
            theirs = load_tokenizer(path, artifact.read_manifest(path))
        except ArtifactError:  # not an artifact: open_references refuses it, naming the field
            continue
        ours, other = tokenizer.get_vocab(), theirs.get_vocab() if theirs is not None else None
        moved = sum(1 for tok, i in ours.items() if other.get(tok) != i) if other is not None else 0
        if moved:
            raise RecipeError(f"{where or f'{source}: gates.{gate}.{key}'}: {path}'s tokenizer gives {moved} of "
                              f"this model's {len(ours)} tokens another id (or none): the same ids are other text "
                              "there, so their next-token distributions cannot be compared")


def check(recipe: Recipe, source: str, vocab_size: int | None = None) -> None:
    """What `validate` checks of the comparisons without loading weights."""
    for gate, key in FIELDS:
        value, where = _setting(recipe, gate, key), f"{source}: gates.{gate}.{key}"
        if value == "fp32-onnx" and recipe.model.streaming:
            raise RecipeError(f"{where}: fp32-onnx needs the whole model in memory to export it, and model.streaming "
                              "is set (use fp32-eager, which streams layer by layer, or an artifact path)")
        if is_artifact_reference(value):
            check_artifact(artifact_path(recipe, value), where, vocab_size)


@dataclass
class References:
    """The runners the gates compare with, and what each is (for the manifest). `close` removes temporary files."""

    accuracy: object
    speed: object
    labels: dict[str, str]
    _cleanup: list[Path] = field(default_factory=list)

    def close(self) -> None:
        for p in self._cleanup:
            shutil.rmtree(p, ignore_errors=True)
        self._cleanup.clear()


def fp32_eager(model, checkpoint, threads: int):
    """The fp32 PyTorch reference: the model in memory, or layer by layer when streaming."""
    if checkpoint is not None:
        from .targets.torch_layerwise import LayerwiseReference

        return LayerwiseReference(checkpoint, threads)
    from .targets.torch_eager import TorchEagerRunner

    return TorchEagerRunner(model, threads)


def fp32_onnx(recipe: Recipe, model, tokenizer, threads: int, workdir: Path, log) -> tuple[object, Path]:
    """The model exported as the recipe's own `export` pass would (same options), saved and run by the cpu-onnx
    target without any other pass."""
    from .pipeline import ModelState, PassContext, run_passes, validate_pass_chain
    from .targets import get_target

    export = next((p.model_dump(exclude_none=True) for p in recipe.passes if p.name == "export"), {"name": "export"})
    plain = recipe_from_dict({"name": f"{recipe.name}-fp32-onnx-reference", "model": recipe.model.model_dump(),
                              "target": "cpu-onnx", "passes": [export]})
    passes = validate_pass_chain(plain, "gates.accuracy.reference: fp32-onnx")
    directory = Path(tempfile.mkdtemp(prefix=".optpipe-reference-", dir=workdir))
    try:
        state = ModelState("torch", torch_model=model, tokenizer=tokenizer)
        log("fp32-onnx reference: exporting the unoptimized model")
        run_passes(passes, state, PassContext(threads=threads, workdir=directory, scratch=directory / "scratch"),
                   log=lambda m: None)
        target = get_target("cpu-onnx")
        target.save(state, directory)
        return target.load(directory, threads), directory
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def open_references(recipe: Recipe, *, model, checkpoint, tokenizer, threads: int, workdir: Path, log=print,
                    vocab_size: int | None = None, where: str | None = None) -> References:
    """Runners for `gates.accuracy.reference` and `gates.speed.baseline` (one runner when both name the same).
    An artifact is verified here, once; `where` names it in errors instead of the recipe field (`--against`)."""
    made: dict[str, tuple[object, str]] = {}
    cleanup: list[Path] = []
    try:
        for gate, key in FIELDS:
            value = _setting(recipe, gate, key)
            if value in made:
                continue
            if value == "fp32-eager":
                runner = fp32_eager(model, checkpoint, threads)
                made[value] = (runner, getattr(runner, "kind", "fp32 eager PyTorch, whole model in memory"))
            elif value == "fp32-onnx":
                if model is None:
                    raise RecipeError(f"gates.{gate}.{key}: fp32-onnx needs the model in memory (model.streaming)")
                runner, directory = fp32_onnx(recipe, model, tokenizer, threads, workdir, log)
                cleanup.append(directory)
                made[value] = (runner, "fp32 ONNX export (the recipe's export pass alone) on ONNX Runtime")
            else:
                path = artifact_path(recipe, value)
                manifest = check_artifact(path, where or f"gates.{gate}.{key}", vocab_size)
                saved = manifest.get("target") or {}
                runner = runner_for(manifest["recipe"]["target"], path, saved, threads)
                made[value] = (runner, f"artifact {path} (recipe {manifest['recipe'].get('name')!r}, "
                                       f"{artifact.digest(path)})")
    except BaseException:
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True)
        raise
    acc, spd = (made[_setting(recipe, g, k)] for g, k in FIELDS)
    return References(acc[0], spd[0], {"accuracy": acc[1], "speed": spd[1]}, cleanup)
