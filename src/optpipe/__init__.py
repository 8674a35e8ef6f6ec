"""optpipe: build, measure and refuse optimized model artifacts. See README.md."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArtifactError,
    BuildError,
    GateFailed,
    InputError,
    ModelLoadError,
    OptpipeError,
    RecipeError,
)
from .recipe import Recipe, load_recipe  # noqa: E402


def build(recipe, output=None, **kwargs):
    """Build `recipe` (a path, dict or Recipe) into `output`; returns a BuildResult (raises GateFailed if refused)."""
    from .builder import build as _build

    return _build(recipe, output, **kwargs)


def gate(artifact_dir, **kwargs):
    from .builder import gate as _gate

    return _gate(artifact_dir, **kwargs)


def load(artifact_dir, threads: int | None = None, *, digest: str | None = None, allow_rejected: bool = False):
    """A Runner for an emitted artifact: `logits(ids)`, `generate(ids or text, max_new_tokens)`; the runner
    carries the artifact's tokenizer. `digest` ("sha256:...", printed by `build`) makes load verify the whole
    artifact first (every file's hash: slow for large artifacts). An artifact whose status is not `passed`
    (kept with --keep-rejected) is refused unless `allow_rejected=True`."""
    from pathlib import Path

    from . import hw
    from .artifact import read_manifest, verify
    from .targets import get_target

    path = Path(artifact_dir)
    manifest = read_manifest(path)
    if digest is not None:
        problems = verify(path, digest)
        if allow_rejected:
            problems = [p for p in problems if not p.startswith("status:")]
        if problems:
            raise ArtifactError(f"{path}: refused: " + "; ".join(problems))
    if manifest.get("status") != "passed" and not allow_rejected:
        raise ArtifactError(f"{path}: status is {manifest.get('status')!r}, not 'passed': this artifact failed its "
                            "gates (load it with allow_rejected=True to inspect it)")
    try:
        n = hw.threads(threads)
    except ValueError as e:
        raise InputError(str(e)) from None
    target = (manifest.get("recipe") or {}).get("target")
    if not isinstance(target, str):
        raise ArtifactError(f"{path}: manifest names no target")
    from .runtime.loaded import ArtifactModel, load_tokenizer

    return ArtifactModel(get_target(target).load(path, n), load_tokenizer(path, manifest), manifest, path)


__all__ = ["build", "gate", "load", "Recipe", "load_recipe", "OptpipeError", "RecipeError", "BuildError",
           "GateFailed", "InputError", "ModelLoadError", "ArtifactError", "__version__"]
