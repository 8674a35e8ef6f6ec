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


def build(recipe, output=None, **kwargs):
    """Build `recipe` (a path, dict or Recipe) into `output`; returns a BuildResult (raises GateFailed if refused)."""
    from .builder import build as _build

    return _build(recipe, output, **kwargs)


def gate(artifact_dir, **kwargs):
    from .builder import gate as _gate

    return _gate(artifact_dir, **kwargs)


def load(artifact_dir, threads: int | None = None, *, digest: str | None = None, allow_rejected: bool = False):
    """An ArtifactModel for an emitted artifact: `logits(ids)`, `generate(text or ids, max_new_tokens, ...)`,
    with the artifact's tokenizer. `digest` ("sha256:...", printed by `build`) makes load verify the whole
    artifact first (every file's hash: slow for large artifacts). An artifact whose status is not `passed`
    (kept with --keep-rejected) is refused unless `allow_rejected=True`. Imports only the runtime."""
    from .runtime import load_artifact

    return load_artifact(artifact_dir, threads, digest=digest, allow_rejected=allow_rejected)


def __getattr__(name):
    """`Recipe` and `load_recipe` are the compiler's: imported on first use, so loading an artifact never
    imports them."""
    if name in ("Recipe", "load_recipe"):
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'optpipe' has no attribute {name!r}")


__all__ = ["build", "gate", "load", "Recipe", "load_recipe", "OptpipeError", "RecipeError", "BuildError",
           "GateFailed", "InputError", "ModelLoadError", "ArtifactError", "__version__"]
