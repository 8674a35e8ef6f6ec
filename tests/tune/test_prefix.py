"""optpipe.tune.prefix: a candidate starts from the longest pass prefix an earlier candidate built, a snapshot is
dropped once no candidate to come needs it, and a started candidate's state is its own."""
from types import SimpleNamespace

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from optpipe.pipeline import ModelState
from optpipe.tune.prefix import Prefixes, copy_state, signature


def _recipe(*names, **options):
    return SimpleNamespace(passes=[SimpleNamespace(name=n, path=None, options=options.get(n, {})) for n in names])


def _state(tag: float) -> ModelState:
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.array([tag], np.float32), "w")])
    return ModelState("onnx", onnx_model=helper.make_model(graph), features={"onnx"})


def test_signatures_see_names_and_options_up_to_a_pass():
    a, b = _recipe("export", "fuse", "quantize-int4"), _recipe("export", "fuse", "quantize-int8")
    assert signature(a, 1) == signature(b, 1) and signature(a, 2) != signature(b, 2)
    assert signature(a, 0) != signature(_recipe("export", "fuse", export={"max_positions": 64}), 0)


def test_candidates_start_from_the_longest_prefix_built_and_snapshots_are_dropped_when_unneeded():
    r1, r2, r3 = (_recipe("export", "fuse", "quantize-int4"), _recipe("export", "fuse", "quantize-int8"),
                  _recipe("export", "static-kv-cache"))
    p = Prefixes([r1, r2, r3])
    assert p.start(r1) == (0, None, [])
    for i in range(3):  # r1 runs its passes; the state after each is kept only while a later candidate needs it
        p.after_pass(r1, i, _state(float(i)), [f"rec{j}" for j in range(i + 1)])  # records so far
    assert len(p.kept) == 2  # after export (r2, r3) and after fuse (r2); nothing after r1's last pass
    done, state, records = p.start(r2)
    assert done == 2 and records == ["rec0", "rec1"]
    assert numpy_helper.to_array(state.onnx_model.graph.initializer[0])[0] == 1.0
    assert [s for s in p.kept] == [signature(r3, 0)]  # export+fuse is needed by no one left
    done, state, _ = p.start(r3)
    assert done == 1 and numpy_helper.to_array(state.onnx_model.graph.initializer[0])[0] == 0.0
    assert p.kept == {}


def test_a_disabled_cache_keeps_nothing():
    r = _recipe("export", "fuse")
    p = Prefixes([r, r], enabled=False)
    p.after_pass(r, 0, _state(0.0), [])
    assert p.kept == {} and p.start(r)[0] == 0


def test_a_copied_state_is_independent_of_its_source():
    src = _state(1.0)
    dup = copy_state(src)
    dup.onnx_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([9.0], np.float32), "w"))
    dup.features.add("quantized")
    dup.handoff.kv_cache.mode = "static"
    assert numpy_helper.to_array(src.onnx_model.graph.initializer[0])[0] == 1.0
    assert src.features == {"onnx"} and src.handoff.kv_cache.mode == "dynamic"
