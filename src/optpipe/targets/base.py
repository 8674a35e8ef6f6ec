"""What every target offers: save a built model into a directory, load it back as a Runner."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass
class Generation:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float  # for len(tokens) - 1 steps: the first token comes from the prefill
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


class Runner(Protocol):
    """Runs a model batch 1: the same code the gates, the benchmark and users call."""

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[S, V] next-token logits for a 1-D token array, computed in one prefill."""

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> Generation:
        """Greedy decoding."""


class Target(Protocol):
    name: str
    final_stage: str

    def save(self, state, directory: Path) -> dict: ...

    def load(self, directory: Path, threads: int) -> Runner: ...


def greedy(logits_row: np.ndarray) -> int:
    return int(np.argmax(logits_row))
