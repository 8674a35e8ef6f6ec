"""optpipe: build, measure and refuse optimized model artifacts. See README.md."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArtifactError,
    BuildError,
    GateFailed,
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


def load(artifact_dir, threads: int | None = None):
    """A Runner (logits / greedy generate) for an emitted artifact."""
    from pathlib import Path

    from . import hw
    from .artifact import read_manifest
    from .targets import get_target

    manifest = read_manifest(Path(artifact_dir))
    return get_target(manifest["recipe"]["target"]).load(Path(artifact_dir), threads or hw.physical_cores())


__all__ = ["build", "gate", "load", "Recipe", "load_recipe", "OptpipeError", "RecipeError", "BuildError",
           "GateFailed", "ModelLoadError", "ArtifactError", "__version__"]
