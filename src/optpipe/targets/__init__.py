"""Targets: how an artifact is saved, loaded and run. One module a target."""
from __future__ import annotations

from ..errors import RecipeError
from .base import Runner, Target  # noqa: F401

TARGETS = ("cpu-onnx", "cpu-torch", "cpu-ipex", "gpu-tensorrt")


def describe_targets() -> dict[str, dict]:
    """`optpipe targets`: each target's final stage and what its artifact is (the module's first docstring line)."""
    import sys

    out = {}
    for name in TARGETS:
        t = get_target(name)
        doc = (sys.modules[type(t).__module__].__doc__ or "").strip().split("\n")[0]
        out[name] = {"final_stage": t.final_stage, "summary": doc}
    return out


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
