"""scripts/bench_cpu.py's bytes-per-token: what the loaded graph reads, not what the file stores."""
import sys
from pathlib import Path

import onnx

from optpipe import models
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.passes.quantize_embedding import EmbeddingConfig, QuantizeEmbedding
from optpipe.passes.quantize_int4 import Int4Config, QuantizeInt4
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_cpu import onnx_bytes_per_token  # noqa: E402


def _int4(path, tmp, scale_dtype) -> tuple[Path, int]:
    model, _, _ = models.load(ModelSpec(source=str(path)))
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=128)))
    Fuse(FuseConfig()).call(state, PassContext())
    QuantizeInt4(Int4Config(exclude=[], scale_dtype=scale_dtype)).call(state, PassContext())
    QuantizeEmbedding(EmbeddingConfig()).call(state, PassContext())
    out = tmp / scale_dtype / "model.onnx"
    out.parent.mkdir()
    onnx.save(state.onnx_model, str(out))
    return out, sum(len(t.raw_data) for t in state.onnx_model.graph.initializer)


def test_float16_storage_is_read_as_float32_after_folding(tiny_llama, tmp_path):
    """Float16 scales are cast to float32 when ONNX Runtime folds constants: the file is smaller, the bytes a decode
    step reads are those of float32 storage, and the tied embedding (a lookup of the head's blocks) adds nothing."""
    f16, stored16 = _int4(tiny_llama, tmp_path, "float16")
    f32, stored32 = _int4(tiny_llama, tmp_path, "float32")
    assert stored16 < stored32
    assert onnx_bytes_per_token(f16) == onnx_bytes_per_token(f32)
    m = onnx.load(str(f32))
    inits = {t.name: len(t.raw_data) for t in m.graph.initializer}
    head = inits["lm_head.qweight"] + inits["lm_head.scales"] + inits["lm_head.zero_points"]
    assert onnx_bytes_per_token(f32) > head  # the head is read every step, the embedding table is not
