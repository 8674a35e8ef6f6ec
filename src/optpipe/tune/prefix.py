"""Shared pass prefixes: candidates that run the same first passes with the same options start from one copy of
the model state after them, instead of exporting (and calibrating) again.

Candidates come in enumeration order, the earliest pass varying slowest, so a prefix is needed by a run of
neighbours; a snapshot is kept while a pending candidate still needs it. Streaming builds (lazy tensors read
from the checkpoint and scratch files) are not snapshotted: each candidate is built from the start.
"""
from __future__ import annotations

import copy
import json
from collections import Counter

import onnx

from ..pipeline import ModelState


def chain(recipe, upto: int | None = None) -> list[dict]:
    """The recipe's passes (the first `upto` + 1) with their options: what decides the model they build."""
    return [{"name": p.name, "path": p.path, **p.options} for p in recipe.passes[:None if upto is None else upto + 1]]


def signature(recipe, upto: int) -> str:
    """The first `upto` + 1 passes with their options: equal signatures build equal states."""
    return json.dumps(chain(recipe, upto), sort_keys=True, default=str)


def copy_state(state: ModelState) -> ModelState:
    """A state later passes can change without touching this one. The tokenizer and the checkpoint are read-only;
    after export, the torch model is no longer changed by any pass and is shared."""
    onnx_copy = None
    if state.onnx_model is not None:
        onnx_copy = onnx.ModelProto()
        onnx_copy.CopyFrom(state.onnx_model)
    return ModelState(state.stage,
                      torch_model=state.torch_model if state.stage != "torch" else copy.deepcopy(state.torch_model),
                      tokenizer=state.tokenizer, onnx_model=onnx_copy, checkpoint=state.checkpoint,
                      features=set(state.features), handoff=copy.deepcopy(state.handoff),
                      effective_weights=dict(state.effective_weights))


class Prefixes:
    def __init__(self, recipes: list, enabled: bool = True):
        self.enabled = enabled
        self.pending = Counter(signature(r, j) for r in recipes for j in range(len(r.passes) - 1))
        self.kept: dict[str, tuple[ModelState, list]] = {}

    def start(self, recipe) -> tuple[int, ModelState | None, list]:
        """(passes already done, a private copy of the state after them, their records) for `recipe`; the
        candidate is counted as started."""
        done, state, records = 0, None, []
        for j in range(len(recipe.passes) - 1):
            sig = signature(recipe, j)
            if sig in self.kept:
                done, (state, records) = j + 1, self.kept[sig]
            self.pending[sig] -= 1
        for sig in [s for s, n in self.pending.items() if n <= 0 and s in self.kept]:
            del self.kept[sig]  # no candidate left needs it
        if state is None:
            return 0, None, []
        return done, copy_state(state), list(records)

    def after_pass(self, recipe, i: int, state: ModelState, records: list) -> None:
        """Keep the state after passes[i] when a candidate still to come starts with the same passes."""
        if not self.enabled or i >= len(recipe.passes) - 1:
            return
        sig = signature(recipe, i)
        if self.pending.get(sig, 0) > 0 and sig not in self.kept:
            self.kept[sig] = (copy_state(state), list(records))
