"""Lazy initializers: nothing is computed before the writer asks, each tensor once, and the file ORT maps."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from optpipe import lazy


def _model(inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in inits]
    outputs = [helper.make_tensor_value_info(t.name + "_out", t.data_type, list(t.dims)) for t in inits]
    return helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializer=inits))


def test_derived_tensors_compute_only_when_written(tmp_path):
    calls = []

    def read():
        calls.append("read")
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    w = lazy.tensor("w", (2, 3), np.float32, read)
    wt = lazy.derived("wt", (3, 2), np.float32, lambda a: a.T * 2, w)
    assert lazy.is_lazy(w) and lazy.is_lazy(wt) and calls == []
    model = _model([wt])
    assert lazy.any_lazy(model)
    lazy.save_streaming(model, tmp_path / "m.onnx", "m.onnx.data", inline_below=0)
    assert calls == ["read"]
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0], str(tmp_path)),
                                  np.arange(6, dtype=np.float32).reshape(2, 3).T * 2)
    assert not lazy.any_lazy(loaded)


def test_shared_computation_runs_once_and_is_dropped_after_its_last_part():
    runs = []

    def compute():
        runs.append(1)
        return {"q": np.ones(4, np.int8), "s": np.full(2, 0.5, np.float32)}

    shared = lazy.Shared(compute, parts=2)
    q = lazy.tensor("q", (4,), np.int8, shared.part("q"))
    s = lazy.tensor("s", (2,), np.float32, shared.part("s"))
    assert lazy.array(q).sum() == 4 and shared.value is not None
    assert lazy.array(s).tolist() == [0.5, 0.5]
    assert runs == [1] and shared.value is None  # both parts written: the computation is not held
    derived = lazy.derived("s_twice", (2,), np.float32, lambda x: 2 * x, s)  # a later reader (quantize-embedding)
    assert lazy.array(derived).tolist() == [1.0, 1.0]
    assert runs == [1, 1] and shared.value is None  # computed again, and not held afterwards either


def test_a_loader_that_disagrees_with_its_declaration_is_named():
    t = lazy.tensor("model.layers.0.w", (2, 2), np.float32, lambda: np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"lazy tensor model.layers.0.w: loader gave float32\[2, 3\], declared "
                                         r"float32\[2, 2\]"):
        lazy.array(t)


def test_large_tensors_are_page_aligned_small_ones_inline(tmp_path):
    small = numpy_helper.from_array(np.arange(4, dtype=np.float32), "small")  # 16 bytes: stays in the proto
    odd = numpy_helper.from_array(np.ones(1001, np.float32), "odd")  # 4,004 bytes: leaves the offset unaligned
    big = lazy.tensor("big", (1 << 18,), np.float32, lambda: np.full(1 << 18, 3.0, np.float32))  # 1 MiB
    model = _model([small, odd, big])
    written = lazy.save_streaming(model, tmp_path / "m.onnx", "m.onnx.data", inline_below=1024)
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in loaded.graph.initializer}
    assert where["small"] == {}
    assert int(where["big"]["offset"]) % 4096 == 0 and int(where["big"]["offset"]) >= 4004
    assert written == (tmp_path / "m.onnx.data").stat().st_size
    full = onnx.load(str(tmp_path / "m.onnx"))
    values = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    assert values["big"].min() == values["big"].max() == 3.0 and values["odd"].sum() == 1001


def test_spill_round_trips_groups(tmp_path):
    spill = lazy.Spill(tmp_path / "scratch")
    spill.put("layer0", {"q": np.arange(3, dtype=np.int8), "s": np.ones((2, 2), np.float16)})
    spill.put("layer1", {"q": np.zeros(1, np.int8)})
    got = spill.get("layer0")
    assert got["q"].tolist() == [0, 1, 2] and got["s"].dtype == np.float16
    assert len(list((tmp_path / "scratch").iterdir())) == 2


def test_a_derived_tensor_reads_its_source_after_the_writer_released_it():
    """The writer releases each lazy tensor once written; one derived from it (quantize-embedding's view of the
    head's scales) may be written later and must still compute."""
    src = lazy.tensor("head.scales", (2, 3), np.float32, lambda: np.arange(6, dtype=np.float32).reshape(2, 3))
    view = lazy.derived("embed.scales", (2, 3, 1), np.float32, lambda s: s.reshape(2, 3, 1), src)
    lazy.release(src)
    assert lazy.array(view)[:, :, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
