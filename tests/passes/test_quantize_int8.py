import pytest

import optpipe

from ..conftest import tiny_recipe


@pytest.mark.parametrize("mode,ops", [("weight-only", {"MatMulNBits"}), ("dynamic", {"MatMulInteger"}),
                                      ("static", {"QuantizeLinear", "DequantizeLinear"})])
def test_int8_modes_build_and_record(tiny_llama, tmp_path, mode, ops):
    passes = ([{"name": "smoothquant", "alpha": 0.5}] if mode == "static" else []) + [
        {"name": "export"}, {"name": "fuse"}, {"name": "quantize-int8", "mode": mode}]
    res = optpipe.build(tiny_recipe(tiny_llama, passes, accuracy={"max_ppl_delta_pct": 50.0}),
                        output=tmp_path / mode, log=lambda m: None)
    rec = res.manifest["passes"][-1]
    assert rec["changes"]["layers_quantized"] >= 8
    import onnx

    graph_ops = {n.op_type for n in onnx.load(str(tmp_path / mode / "model.onnx"), load_external_data=False).graph.node}
    assert ops <= graph_ops


@pytest.mark.parametrize("flags,reduced", [(frozenset({"avx2"}), True),
                                           (frozenset({"avx2", "avx512f", "avx512_vnni"}), False),
                                           (frozenset({"avx2", "avx_vnni"}), False)])
def test_reduce_range_follows_the_cpu_and_is_recorded(tiny_llama, tmp_path, monkeypatch, flags, reduced):
    """Without VNNI, u8 x s8 sums can saturate at full range: `auto` then quantizes weights to 7 bits."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from optpipe import hw

    monkeypatch.setattr(hw, "cpu_flags", lambda: flags)
    passes = [{"name": "export"}, {"name": "fuse"}, {"name": "quantize-int8", "mode": "dynamic"}]
    res = optpipe.build(tiny_recipe(tiny_llama, passes, accuracy={"max_ppl_delta_pct": 50.0}),
                        output=tmp_path / "a", log=lambda m: None)
    changes = res.manifest["passes"][-1]["changes"]
    assert changes["reduce_range"] is reduced
    model = onnx.load(str(tmp_path / "a" / "model.onnx"))
    int8 = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    top = max(int(np.abs(a).max()) for a in int8)
    assert top <= 64 if reduced else top == 127  # 7-bit weights: ORT's reduced range is [-64, 63]
