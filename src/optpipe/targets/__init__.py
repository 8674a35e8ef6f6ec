"""Targets: how an artifact is saved, loaded and run. One module a target."""
from __future__ import annotations

import importlib
import sys

from ..errors import RecipeError
from .base import Runner, Target  # noqa: F401

# name -> module.class; a target's module is imported only when it is used
TARGETS = {"cpu-onnx": "cpu_onnx.CpuOnnxTarget", "cpu-torch": "cpu_torch.CpuTorchTarget",
           "cpu-ipex": "cpu_ipex.CpuIpexTarget", "gpu-tensorrt": "gpu_tensorrt.GpuTensorRTTarget"}


def describe_targets() -> dict[str, dict]:
    """`optpipe targets`: each target's final stage and what its artifact is (the module's first docstring line)."""
    out = {}
    for name in TARGETS:
        t = get_target(name)
        doc = (sys.modules[type(t).__module__].__doc__ or "").strip().split("\n")[0]
        out[name] = {"final_stage": t.final_stage, "summary": doc}
    return out


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise RecipeError(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
    module, cls = TARGETS[name].split(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
