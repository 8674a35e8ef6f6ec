"""`quantize-embedding`: the token lookup in GatherBlockQuantized, own RTN blocks or the tied head's stored once."""
import copy

import numpy as np
import pytest
import torch

import optpipe
from optpipe import models
from optpipe import quant as _quant
from optpipe.errors import BuildError
from optpipe.passes._onnx import initializer_map
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.quantize_embedding import EmbeddingConfig, QuantizeEmbedding
from optpipe.passes.quantize_int4 import Int4Config, QuantizeInt4
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder

from ..test_streaming import both_builds

PROMPT = np.arange(3, 40)


def graph(path, on_grid: bool = False) -> ModelState:
    """The tiny model's float graph; `on_grid`: its embedding (= the tied head) on the block-32 Q4_1 grid first
    (float16 scales and minima, as a GGUF file stores them)."""
    model, _, _ = models.load(ModelSpec(source=str(path)))
    if on_grid:
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            emb.copy_(torch.from_numpy(on_q4_1_grid(emb.numpy())))
    return ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))


def on_q4_1_grid(w: np.ndarray) -> np.ndarray:
    return _quant.rtn(w, 4, 32, "float", scale_dtype=np.float16).dequantize()


def ops(state) -> list[str]:
    return [n.op_type for n in state.onnx_model.graph.node]


@pytest.mark.parametrize("bits,scheme,scale_dtype", [(8, "symmetric", "float16"), (4, "int", "float16"),
                                                     (4, "float", "float16"), (4, "float", "float32")])
def test_own_blocks_replace_the_float_table(tiny_llama, bits, scheme, scale_dtype):
    """Without a quantized head the embedding is quantized by RTN: the float table is gone, the lookup is
    GatherBlockQuantized, and the logits are those of the float graph with the RTN-dequantized table in it (scales
    stored as asked: a float16 table is half the bytes of a float32 one). Float zero points are stored in integer
    form (`quant.integer_form`: their remainder in two digits, within ~d/400), hence a looser bound for them."""
    from onnx import numpy_helper

    state = graph(tiny_llama)
    table = state.onnx_model.graph.node[0].input[0]
    reference = copy.deepcopy(state.onnx_model)
    init = initializer_map(reference)[table]
    deq = _quant.rtn(numpy_helper.to_array(init), bits, 32, scheme, scale_dtype=scale_dtype)
    init.CopyFrom(numpy_helper.from_array(deq.dequantize().astype(np.float32), table))
    res = QuantizeEmbedding(EmbeddingConfig(bits=bits, zero_point=scheme, scale_dtype=scale_dtype)).call(
        state, PassContext())
    stored = initializer_map(state.onnx_model)[table.rsplit(".", 1)[0] + ".scales"]
    assert numpy_helper.to_array(stored).dtype == np.dtype(scale_dtype)
    assert res.modified and "GatherBlockQuantized" in ops(state)
    assert table not in initializer_map(state.onnx_model)
    assert 0 < res.changes["weight_rel_error"] < (0.01 if bits == 8 else 0.15)
    got = OnnxDecoder.from_proto(state.onnx_model).logits(PROMPT)
    assert np.abs(got - OnnxDecoder.from_proto(reference).logits(PROMPT)).max() < (1e-3 if scheme == "float" else 1e-4)


def test_tied_head_blocks_are_shared_and_keep_the_grid(tiny_llama):
    """A tied embedding on the Q4_1 grid, its head quantized with float zero points (fitted exactly there, stored in
    integer form): the lookup reads the head's qweight itself (no second copy of the blocks, the remainder's digit
    blocks included) and the logits stay within the digits' bound of the float graph's."""
    state = graph(tiny_llama, on_grid=True)
    want = OnnxDecoder.from_proto(state.onnx_model).logits(PROMPT)
    QuantizeInt4(Int4Config(accuracy_level=0, include=["lm_head"], exclude=[])).call(state, PassContext())
    before = sum(t.ByteSize() for t in state.onnx_model.graph.initializer)
    res = QuantizeEmbedding(EmbeddingConfig()).call(state, PassContext())
    assert res.changes["scheme"].startswith("shared with lm_head (int4 rtn block32 float")
    gbq = next(n for n in state.onnx_model.graph.node if n.op_type == "GatherBlockQuantized")
    assert gbq.input[0] == "lm_head.qweight"
    vocab, hidden = 256, 64
    saved = before - sum(t.ByteSize() for t in state.onnx_model.graph.initializer)
    assert saved > 0.9 * 4 * vocab * hidden - 4 * vocab * hidden // 32 * 3  # the float table, less scales/zp/remainder
    got = OnnxDecoder.from_proto(state.onnx_model).logits(PROMPT)
    assert np.abs(got - want).max() < 1e-3


def test_share_head_off_quantizes_the_embedding_alone(tiny_llama):
    state = graph(tiny_llama)
    QuantizeInt4(Int4Config(accuracy_level=0, include=["lm_head"], exclude=[])).call(state, PassContext())
    res = QuantizeEmbedding(EmbeddingConfig(share_head=False)).call(state, PassContext())
    assert res.changes["scheme"] == "int8 rtn block32 symmetric (float16 scales)"
    gbq = next(n for n in state.onnx_model.graph.node if n.op_type == "GatherBlockQuantized")
    assert gbq.input[0] != "lm_head.qweight"


def test_untied_head_is_not_shared(tiny_llama):
    state = graph(tiny_llama)
    for p in state.onnx_model.metadata_props:
        if p.key == "optpipe.tied_embeddings":
            p.value = "0"
    QuantizeInt4(Int4Config(accuracy_level=0, include=["lm_head"], exclude=[])).call(state, PassContext())
    res = QuantizeEmbedding(EmbeddingConfig()).call(state, PassContext())
    assert not res.changes["scheme"].startswith("shared")


def test_second_run_names_the_cause(tiny_llama):
    state = graph(tiny_llama)
    QuantizeEmbedding(EmbeddingConfig()).call(state, PassContext())
    with pytest.raises(BuildError, match="quantize-embedding: .*found 0 .*already quantized"):
        QuantizeEmbedding(EmbeddingConfig()).call(copy.deepcopy(state), PassContext())


@pytest.mark.parametrize("share", [True, False])
def test_streaming_build_writes_the_same_embedding(tiny_llama, tmp_path, share):
    chain = [{"name": "export"}, {"name": "fuse"},
             {"name": "quantize-int4", "accuracy_level": 0, "include": ["lm_head"], "exclude": []},
             {"name": "quantize-embedding", "bits": 4, "zero_point": "float", "share_head": share}]
    mem, st, _ = both_builds(tiny_llama, chain, tmp_path)
    assert mem.manifest["passes"][-1]["changes"]["scheme"] == st.manifest["passes"][-1]["changes"]["scheme"]
    a = optpipe.load(tmp_path / "mem", threads=1).logits(PROMPT)
    b = optpipe.load(tmp_path / "st", threads=1).logits(PROMPT)
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("route", ["qwen2 family", "llama generic"])
def test_other_families_and_the_generic_route_share_the_head(tiny_qwen2, tiny_llama, route):
    """The lookup is found and shared by what the graph says (a Gather by input_ids, the tie in its metadata),
    not by SmolLM2's names: a Qwen2 graph and a torch.onnx-traced graph share the head's blocks and keep its
    grid (head and embedding on it: logits within the float zero point's digit bound of the float graph's)."""
    from optpipe.passes.export import build_generic_graph

    path = tiny_qwen2 if route.startswith("qwen2") else tiny_llama
    model, _, _ = models.load(ModelSpec(source=str(path)))
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(torch.from_numpy(on_q4_1_grid(emb.numpy())))
    cfg = ExportConfig(max_positions=256, method="generic" if "generic" in route else "auto")
    proto = build_generic_graph(model, cfg) if "generic" in route else build_decoder_graph(model, cfg)
    state = ModelState("onnx", onnx_model=proto)
    want = OnnxDecoder.from_proto(state.onnx_model).logits(PROMPT)
    QuantizeInt4(Int4Config(accuracy_level=0, include=["lm_head"], exclude=[])).call(state, PassContext())
    res = QuantizeEmbedding(EmbeddingConfig()).call(state, PassContext())
    assert res.changes["scheme"].startswith("shared with lm_head")
    got = OnnxDecoder.from_proto(state.onnx_model).logits(PROMPT)
    assert np.abs(got - want).max() < 1e-3
