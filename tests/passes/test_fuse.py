"""Export matches PyTorch and `fuse` keeps the logits (Llama and Qwen2)."""
import copy

import numpy as np
import pytest

from optpipe import models
from optpipe.passes._onnx import tensor_ranks
from optpipe.passes.export import ExportConfig, build_decoder_graph, check_against_torch
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder


def load(path):
    model, tok, _ = models.load(ModelSpec(source=str(path)))
    return model


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_export_matches_torch_and_fuse_preserves_logits(fixture, request):
    model = load(request.getfixturevalue(fixture))
    onnx_model = build_decoder_graph(model, ExportConfig(max_positions=256))
    check = check_against_torch(model, onnx_model, atol=1e-3)
    assert check["max_abs_logit_diff"] < 1e-3
    ids = np.random.default_rng(0).integers(0, 256, 40)
    ref = OnnxDecoder.from_proto(onnx_model).logits(ids)
    state = ModelState("onnx", onnx_model=copy.deepcopy(onnx_model))
    res = Fuse(FuseConfig()).call(state, PassContext())
    assert res.changes["attention_gqa"] == 2 and res.changes["qkv_packed"] == 2 and res.changes["gate_up"] == 2
    assert res.changes["skip_rmsnorm"] == 4 and res.changes["rmsnorm"] == 1
    ops = {n.op_type for n in state.onnx_model.graph.node}
    assert "GroupQueryAttention" in ops and not state.onnx_model.functions
    # the hidden states' rank is followed through the fused ops to every linear (the float-zero-point kernel's
    # block sums use it for a constant view)
    ranks = tensor_ranks(state.onnx_model)
    assert {ranks.get(n.input[0]) for n in state.onnx_model.graph.node if n.op_type == "MatMul"} == {3}
    fused = OnnxDecoder.from_proto(state.onnx_model).logits(ids)
    assert np.abs(fused - ref).max() < 1e-3
