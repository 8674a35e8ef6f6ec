"""Running an emitted artifact: what `optpipe.load` returns."""
from .loaded import ArtifactModel, Completion, sampler

__all__ = ["ArtifactModel", "Completion", "sampler"]
