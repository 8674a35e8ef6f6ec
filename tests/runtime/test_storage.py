"""Bits per weight, read from what an artifact stores: exact byte counts on tiny models whose layout is known
(INT4 block 32 with float16 scales and 4-bit zero points is 4 + 16/32 + 4/32 = 4.625 bits a weight; cpu-torch's
bf16 scales and zeros make 5.0), a tied matrix counted once, and the figures in the manifest, `inspect` and the
reports."""
import json
from pathlib import Path

import optpipe
from optpipe.cli import main

from ..conftest import FUSED_INT4, TORCH_INT4, tiny_recipe, torch_recipe

V, H, I, LAYERS = 256, 64, 128, 2  # the tiny model's vocabulary, hidden and MLP widths, decoder layers
DECODER = LAYERS * (2 * H * H + H * H + 3 * H * I)  # q + k + v (2 of 4 heads are KV: H/2 each), o, gate + up + down


class _Built:
    def __init__(self, manifest, path):
        self.manifest, self.path = manifest, path


def _build(recipe, out):
    """The build's manifest and directory, whatever the speed gate said (storage is read whether or not it passed:
    these tests may share the machine with other work; a refused candidate is kept beside `out`)."""
    try:
        res = optpipe.build(recipe, output=out, log=lambda m: None, keep_rejected=True)
        return _Built(res.manifest, res.artifact_path)
    except optpipe.errors.GateFailed as e:
        return _Built(e.report["manifest"], Path(e.report["rejected_path"]))


def _storage(res):
    return res.manifest["gates"]["coverage"]["storage"]


INT_ZP = FUSED_INT4[:3] + [{**FUSED_INT4[3], "zero_point": "int"}]


def test_int4_block32_decoder_is_4_625_bits_and_the_float_head_32(tiny_llama, tmp_path):
    res = _build(tiny_recipe(tiny_llama, INT_ZP), tmp_path / "a")
    s = _storage(res)
    int4 = s["by_precision"]["int4"]
    assert int4["parameters"] == DECODER and int4["bits_per_weight"] == 4.625
    assert int4["bytes"] == DECODER // 2 + DECODER // 32 * 2 + DECODER // 32 // 2  # codes, fp16 scales, 4-bit zps
    assert s["by_class"]["embedding"] == {"layers": 1, "parameters": V * H, "bytes": 4 * V * H, "bits_per_weight": 32.0}
    assert s["by_class"]["head"]["bits_per_weight"] == 32.0 and s["tied_embeddings"] is True
    assert s["layer_parameters"] == DECODER + V * H  # the tied matrix once, though stored twice (Gather and MatMul)
    # every stored byte of the weights file is some tensor's, counted once (the rest sit inside model.onnx)
    assert s["bytes"] == res.manifest["files"]["model.onnx.data"]["bytes"] + _graph_only_bytes(res.path)
    assert res.manifest["summary"]["gates.coverage.bits_per_weight"] == s["bits_per_weight"]


def _graph_only_bytes(path):
    """Initializer bytes kept inside model.onnx (below the external-data threshold): counted, not in the .data file."""
    import onnx

    from optpipe.runtime.storage import _tensor_bytes

    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return sum(_tensor_bytes(t) for t in m.graph.initializer if not t.external_data)


def test_float_zero_points_count_their_remainder_digits_as_bytes_not_parameters(tiny_llama, tmp_path):
    """The float-zero-point form stores 2 extra digit blocks along K (the kernel's K = k + 2 x 32 here): the
    parameters stay the weight's own k x N, so bits per weight rise by K / k."""
    res = _build(tiny_recipe(tiny_llama, FUSED_INT4), tmp_path / "a")
    s = _storage(res)
    assert s["by_precision"]["int4"]["parameters"] == DECODER
    got = {k: v["bits_per_weight"] for k, v in s["by_class"].items() if k not in ("embedding", "head")}
    assert got == {"qkv_proj": 4.625 * 128 / 64, "o_proj": 4.625 * 128 / 64, "gate_up_proj": 4.625 * 128 / 64,
                   "down_proj": 4.625 * 192 / 128}


def test_a_shared_embedding_reads_the_heads_codes_and_is_counted_once(tiny_llama, tmp_path):
    passes = INT_ZP[:3] + [{**INT_ZP[3], "exclude": []},
                           {"name": "quantize-embedding", "bits": 4, "block_size": 32, "zero_point": "int"}]
    res = _build(tiny_recipe(tiny_llama, passes, accuracy={"max_ppl_delta_pct": 50.0}), tmp_path / "a")
    s = _storage(res)
    # the lookup reads the head's codes and scales: its own bytes are its zero points' layout (V x blocks bytes)
    # and two shape constants, not a second copy of the matrix
    assert s["by_class"]["embedding"]["bytes"] <= V * (H // 32) + 64
    assert s["by_class"]["embedding"]["parameters"] == 0  # the head's matrix: its parameters are counted there
    assert s["by_class"]["head"]["bits_per_weight"] == 4.625 and s["tied_embeddings"] is True
    assert s["layer_parameters"] == DECODER + V * H  # the tied matrix once


def test_cpu_torch_int4_with_bf16_scales_and_zeros_is_5_bits(tiny_llama, tmp_path):
    res = _build(torch_recipe(tiny_llama, TORCH_INT4), tmp_path / "t")
    s = _storage(res)
    assert s["by_precision"]["int4"]["bits_per_weight"] == 5.0
    assert s["by_precision"]["int4"]["parameters"] == LAYERS * (H * 2 * H + H * H // 2 * 2 + 3 * H * I)
    assert s["by_class"]["head"]["bits_per_weight"] == 8 + 32 / H  # per-row fp32 scale over H weights


def test_inspect_and_the_reports_state_the_bits(tiny_llama, tmp_path, capsys):
    out = _build(tiny_recipe(tiny_llama, INT_ZP), tmp_path / "a").path
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits per weight" in text and "precision int4" in text and "4.625 bits/weight" in text
    assert main(["inspect", str(out), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["gates"]["coverage"]["storage"]["by_precision"]["int4"]["bits_per_weight"] == 4.625
    assert "## Storage:" in (out / "report.md").read_text() and "bits per weight</h2>" in (out / "report.html").read_text()
