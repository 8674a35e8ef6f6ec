"""Targets: how an artifact is saved, loaded and run. One module a target."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError
from .base import Runner, Target  # noqa: F401


@dataclass(frozen=True)
class PlannedTarget:
    """Named in the recipe schema, not built yet: validation passes, a build says so clearly."""

    name: str
    final_stage: str
    why: str
    implemented: bool = False


_PLANNED = {
    "cpu-ipex": PlannedTarget("cpu-ipex", "torch", "the IPEX backend is planned as an optional extra (IPEX is archived upstream)"),
}


def get_target(name: str):
    if name == "cpu-onnx":
        from .cpu_onnx import CpuOnnxTarget

        return CpuOnnxTarget()
    if name == "cpu-torch":
        from .cpu_torch import CpuTorchTarget

        return CpuTorchTarget()
    if name == "gpu-tensorrt":
        from .gpu_tensorrt import GpuTensorRTTarget

        return GpuTensorRTTarget()
    if name in _PLANNED:
        return _PLANNED[name]
    raise RecipeError(f"unknown target {name!r}")
