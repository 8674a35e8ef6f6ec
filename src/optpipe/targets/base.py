"""What every target offers: save a built model into a directory, load it back as a Runner."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..runtime.generation import Generation, Runner  # noqa: F401 - re-exported for the benchmark scripts


class Target(Protocol):
    """Every hook the builder calls; `TargetBase` gives the defaults (nothing to check, speed measurable)."""

    name: str
    final_stage: str

    def save(self, state, directory: Path) -> dict: ...

    def load(self, directory: Path, threads: int) -> Runner: ...

    def preflight(self) -> None:
        """Before the model loads: raise RecipeError when this environment cannot build for the target."""

    def speed_unmeasurable(self) -> str | None:
        """Why this machine cannot run the target's speed gate (no GPU for TensorRT); None: it can."""

    def speed_failure_hint(self, saved: dict | None) -> str | None:
        """A likely cause to add to a failed speed gate (e.g. IPEX without its fast kernels on this ISA)."""


class TargetBase:
    """Defaults for the optional hooks of `Target`."""

    def preflight(self) -> None:
        return None

    def speed_unmeasurable(self) -> str | None:
        return None

    def speed_failure_hint(self, saved: dict | None) -> str | None:
        return None
