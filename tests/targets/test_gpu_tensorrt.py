"""gpu-tensorrt on a tiny model: builds TensorRT-ready ONNX, speed recorded as not measured, refusals."""
import importlib.util
import json
import shutil

import onnx
import pytest

import optpipe
from optpipe.cli import main
from optpipe.targets.trt_lint import lint

from ..conftest import DATA, tiny_recipe, write_recipe

INT8 = [{"name": "smoothquant"}, {"name": "export"}, {"name": "qdq-int8", "exclude": ["lm_head"]}, {"name": "fp16"}]
INT4 = [{"name": "awq", "block_size": 64}, {"name": "export"},
        {"name": "qdq-int4", "algorithm": "gptq", "block_size": 64, "exclude": []}, {"name": "fp16"}]
INT4_SEQUENTIAL = [INT4[0], INT4[1], {**INT4[2], "sequential": True}, INT4[3]]


def trt_recipe(model_dir, passes, **gates):
    r = tiny_recipe(model_dir, passes, **gates)
    r["target"] = "gpu-tensorrt"
    r["gates"]["speed"] = gates.get("speed", {"unmeasured": "allow"})
    return r


@pytest.mark.parametrize("passes,dq_type", [(INT8, onnx.TensorProto.INT8), (INT4, onnx.TensorProto.INT4),
                                            (INT4_SEQUENTIAL, onnx.TensorProto.INT4)])
def test_trt_artifact_is_lint_clean_and_speed_not_measured(tiny_llama, tmp_path, passes, dq_type, capsys):
    out = tmp_path / "trt"
    res = optpipe.build(trt_recipe(tiny_llama, passes, accuracy={"max_ppl_delta_pct": 50.0}), output=out,
                        log=lambda m: None)
    m = res.manifest
    assert m["gates"]["speed"]["status"] == "not measured" and m["gates"]["speed"]["passed"] is None
    assert m["summary"]["gates.speed.status"] == "not measured"
    assert "--stronglyTyped" in m["target"]["trtexec"] and "--maxShapes=input_ids:4x" in m["target"]["trtexec"]
    assert json.loads((out / "tensorrt.json").read_text())["optimization_profile"]["min"]["input_ids"] == [1, 1]
    checks = m["target"]["checks"]
    assert "trt-lint: passed" in checks and "onnx.checker full_check: passed" in checks
    if importlib.util.find_spec("onnx_graphsurgeon") and shutil.which("polygraphy"):
        assert "polygraphy check lint: passed" in checks
    model = onnx.load(str(out / "model.onnx"))
    assert lint(model) == [] and not model.functions
    assert {i.type.tensor_type.elem_type for i in model.graph.output} == {onnx.TensorProto.FLOAT16}
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert any(t == dq_type for t in weights.values())
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    # optpipe.load finds the saved tokenizer: text in, text out (the CPU check runner)
    assert m["target"]["tokenizer_dir"] == "tokenizer"
    made = optpipe.load(out, threads=1).generate("hello", max_new_tokens=3)
    assert isinstance(made.text, str) and 1 <= len(made.tokens) <= 3
    # the pre-deploy check re-runs the accuracy gate and reports speed as not measured
    assert main(["gate", str(out), "--threads", "1"]) == 0
    assert "speed: status=not measured" in capsys.readouterr().out


def test_speed_gate_cannot_be_skipped_silently(tiny_llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, trt_recipe(tiny_llama, INT8, speed={"min_decode_speedup": 1.0}))
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "gates.speed: the gpu-tensorrt speed gate cannot run here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trt_accuracy_gate_rejects_corrupted_scales(tiny_llama, tmp_path):
    passes = INT8[:3] + [{"name": "corrupt-scales", "path": str(DATA / "corrupt_scales.py")}, {"name": "fp16"}]
    # a near-uniform random model barely moves perplexity; KL and top-1 agreement catch the damage
    gate = {"max_ppl_delta_pct": 5.0, "max_mean_kl": 0.1, "min_top1_agreement": 0.5}
    with pytest.raises(optpipe.GateFailed, match=r"(?s)mean KL .* exceeds max_mean_kl.*top-1 agreement .* below"):
        optpipe.build(trt_recipe(tiny_llama, passes, accuracy=gate), output=tmp_path / "o", allow_plugins=True,
                      log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_lint_failure_fails_the_build(tiny_llama, tmp_path):
    passes = [{"name": "export"}, {"name": "qdq-int8"}]  # no fp16 pass: float32 weights and I/O
    with pytest.raises(optpipe.BuildError, match=r"(?s)TensorRT-readiness lint: .*float32"):
        optpipe.build(trt_recipe(tiny_llama, passes), output=tmp_path / "o", log=lambda m: None)
    assert not (tmp_path / "o").exists()
