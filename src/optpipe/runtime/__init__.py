"""Running an emitted artifact: what `optpipe.load` returns. Needs nothing from the compiler (passes, targets,
builder): an import-linter contract in pyproject.toml holds it to that."""
from .loaded import ArtifactModel, Completion, load_artifact, runner_for, sampler

__all__ = ["ArtifactModel", "Completion", "load_artifact", "runner_for", "sampler"]
