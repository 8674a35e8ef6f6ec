"""Targets: how an artifact is saved, loaded and run. One module a target."""
from __future__ import annotations

from ..errors import RecipeError
from .base import Runner, Target  # noqa: F401


def get_target(name: str):
    if name == "cpu-onnx":
        from .cpu_onnx import CpuOnnxTarget

        return CpuOnnxTarget()
    if name == "cpu-torch":
        from .cpu_torch import CpuTorchTarget

        return CpuTorchTarget()
    if name == "cpu-ipex":
        from .cpu_ipex import CpuIpexTarget

        return CpuIpexTarget()
    if name == "gpu-tensorrt":
        from .gpu_tensorrt import GpuTensorRTTarget

        return GpuTensorRTTarget()
    raise RecipeError(f"unknown target {name!r}")
