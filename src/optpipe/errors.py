"""Errors that the CLI turns into exit codes: 2 for bad input, 3 for a refused artifact, 1 for a failed build."""
from __future__ import annotations


class OptpipeError(Exception):
    """Base class: a message meant for the user, never a traceback."""

    exit_code = 1


class RecipeError(OptpipeError):
    """The recipe (or a CLI argument standing in for one of its fields) is malformed."""

    exit_code = 2


class InputError(OptpipeError, ValueError):
    """An argument of the Python API (token ids, lengths, sampling settings) is out of range."""

    exit_code = 2


class ModelLoadError(OptpipeError):
    """The model named by the recipe cannot be found or loaded."""

    exit_code = 2


class BuildError(OptpipeError):
    """A pass or the target failed; names the pass at fault."""

    exit_code = 1


class GateFailed(OptpipeError):
    """The candidate artifact did not pass a gate; nothing was emitted."""

    exit_code = 3

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class ArtifactError(OptpipeError):
    """An artifact directory is missing, incomplete or was modified."""

    exit_code = 4
