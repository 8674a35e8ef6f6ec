"""What every target offers: save a built model into a directory, load it back as a Runner."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..runtime.generation import Generation, OnToken, Pick, Runner, decode, greedy  # noqa: F401 - re-exported


class Target(Protocol):
    name: str
    final_stage: str

    def save(self, state, directory: Path) -> dict: ...

    def load(self, directory: Path, threads: int) -> Runner: ...
