"""Every target declares every hook the builder calls (no `hasattr` probing), and is listed with its summary."""
import inspect

import pytest

from optpipe.errors import RecipeError
from optpipe.targets import TARGETS, Target, describe_targets, get_target


@pytest.mark.parametrize("name", TARGETS)
def test_each_target_implements_the_protocol(name):
    target = get_target(name)
    assert target.name == name and target.final_stage in ("onnx", "torch")
    for hook in ("save", "load", "preflight", "speed_unmeasurable", "speed_failure_hint"):
        assert callable(getattr(target, hook)), hook
        assert hook in dir(Target)
        own, declared = inspect.signature(getattr(target, hook)), inspect.signature(getattr(Target, hook))
        assert list(own.parameters) == list(declared.parameters)[1:], hook  # bound: no `self`
    why = target.speed_unmeasurable()
    assert why is None or (isinstance(why, str) and why)
    assert (why is None) == (name != "gpu-tensorrt")  # no GPU here: only TensorRT cannot be timed


def test_targets_are_described_and_an_unknown_one_is_named():
    described = describe_targets()
    assert list(described) == list(TARGETS)
    assert all(d["summary"] and d["final_stage"] for d in described.values())
    assert described["gpu-tensorrt"]["final_stage"] == "onnx" and described["cpu-torch"]["final_stage"] == "torch"
    with pytest.raises(RecipeError, match="unknown target 'tpu'"):
        get_target("tpu")
