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
