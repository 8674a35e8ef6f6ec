"""`gpu-tensorrt`: a TensorRT-ready ONNX artifact (explicit Q/DQ, fp16, standard ops), checked on the CPU.

Saving inlines the export's local functions, runs the TensorRT-readiness lint (any violation fails the build),
saves with external data, runs `onnx.checker` (full check, by path) and shape inference, and writes
`tensorrt.json`: the optimization profile (min/opt/max of batch, sequence and past length) and the exact
`trtexec` command that builds the engine. The runner used by the accuracy gate is ONNX Runtime's CPU provider
with graph optimizations disabled (its DQ+MatMul fusions have known silent miscomputes), so the graph is
evaluated as written. Speed cannot be measured without an NVIDIA GPU and TensorRT: see `speed_unmeasurable`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import inliner

from .. import hw
from ..errors import BuildError
from ..runtime.ort_decoder import OnnxDecoder
from .base import TargetBase
from .trt_lint import lint, lint_profile

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_DIR = "tokenizer"
PROFILE_FILE = "tensorrt.json"


def profile(meta: dict[str, str], max_batch: int = 4, opt_seq: int = 128, max_total: int = 2048) -> dict:
    """min/opt/max shapes for every dynamic input: batch, new tokens, past tokens (total <= max_total)."""
    layers, kv, d = (int(meta[k]) for k in ("optpipe.num_layers", "optpipe.kv_num_heads", "optpipe.head_dim"))
    max_total = min(max_total, int(meta["optpipe.max_length"]))
    dims = {"min": (1, 1, 0), "opt": (1, 1, opt_seq), "max": (max_batch, max_total // 2, max_total // 2)}
    shapes = {}
    for level, (b, s, p) in dims.items():
        x = {"input_ids": [b, s], "attention_mask": [b, s + p]}
        for i in range(layers):
            for kvn in ("key", "value"):
                x[f"past_key_values.{i}.{kvn}"] = [b, kv, p, d]
        shapes[level] = x
    return shapes


def trtexec_command(shapes: dict) -> str:
    def fmt(level):
        return ",".join(f"{k}:{'x'.join(str(v) for v in dims)}" for k, dims in shapes[level].items())

    return (f"trtexec --onnx={MODEL_FILE} --stronglyTyped --saveEngine=model.engine "
            f"--minShapes={fmt('min')} --optShapes={fmt('opt')} --maxShapes={fmt('max')}")


def polygraphy_lint(path: Path) -> str:
    """`polygraphy check lint` when polygraphy (and onnx-graphsurgeon) are installed (`pip install -e '.[trt]'`).
    Returns what happened, for the manifest; raises BuildError when it reports failing nodes."""
    import importlib.util
    import subprocess

    exe = shutil.which("polygraphy")
    if exe is None or importlib.util.find_spec("onnx_graphsurgeon") is None:
        return "polygraphy check lint: skipped (polygraphy / onnx-graphsurgeon not installed)"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "lint.json"
        proc = subprocess.run([exe, "check", "lint", str(path), "-o", str(report)], capture_output=True, text=True)
        failing = json.loads(report.read_text()).get("failing", []) if report.is_file() else None
    if proc.returncode != 0 or failing:
        detail = ", ".join(failing[:10]) if failing else proc.stdout[-500:] + proc.stderr[-500:]
        raise BuildError(f"polygraphy check lint failed: {detail}")
    return "polygraphy check lint: passed"


def cpu_check_int8_note() -> str:
    """Why the CPU accuracy check of a W8A8 artifact differs between machines (recorded in the manifest)."""
    dot = hw.int8_dot_product()
    if dot:
        return f"int8 products on {dot}: exact int32 accumulation, as TensorRT computes them"
    return ("no VNNI on the build CPU: ONNX Runtime's u8 x s8 kernels (AVX2 vpmaddubsw) can saturate int16 "
            "intermediate sums, so the accuracy gate here can overstate the loss TensorRT's exact int8 shows "
            "(the SmolLM2 TRT INT8 recipe measured +2.06% on an AVX2-only EPYC, +1.15% on an AVX-512 VNNI one)")


class GpuTensorRTTarget(TargetBase):
    name = "gpu-tensorrt"
    final_stage = "onnx"

    def speed_unmeasurable(self) -> str | None:
        if shutil.which("nvidia-smi") is None:
            return "no NVIDIA GPU on this machine (nvidia-smi not found)"
        if shutil.which("trtexec") is None:
            return "TensorRT's trtexec is not on PATH"
        return "TensorRT engine timing is not implemented in this optpipe version"

    def save(self, state, directory: Path) -> dict:
        model = inliner.inline_local_functions(state.onnx_model)
        used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
        keep = [o for o in model.opset_import if o.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        violations = lint(model)
        if violations:
            shown = "\n  ".join(violations[:40])
            more = f"\n  ... and {len(violations) - 40} more" if len(violations) > 40 else ""
            raise BuildError(f"TensorRT-readiness lint: {len(violations)} violation(s):\n  {shown}{more}")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MODEL_FILE
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        try:
            onnx.checker.check_model(str(path), full_check=True)
            with tempfile.TemporaryDirectory() as tmp:
                onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True)
        except Exception as e:  # noqa: BLE001 - checker/shape-inference errors become a build failure
            raise BuildError(f"onnx checker / shape inference failed: {type(e).__name__}: {str(e)[:500]}") from None
        meta = {p.key: p.value for p in model.metadata_props}
        shapes = profile(meta)
        bad = lint_profile(model, shapes)
        if bad:
            raise BuildError("TensorRT optimization profile: " + "; ".join(bad[:10]))
        checks = ["trt-lint: passed", "optimization profile: covers every dynamic input", "onnx.checker full_check: passed", "shape inference (strict): passed",
                  polygraphy_lint(path)]
        info = {"optimization_profile": shapes, "trtexec": trtexec_command(shapes),
                "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                "checks": checks}
        (directory / PROFILE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if state.tokenizer is not None:
            state.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        return {"format": "onnx (TensorRT-ready: explicit Q/DQ, fp16)", "model_file": MODEL_FILE,
                "external_data": DATA_FILE, "tensorrt": PROFILE_FILE, "trtexec": info["trtexec"], "checks": checks,
                "tokenizer_dir": TOKENIZER_DIR if state.tokenizer is not None else None,
                "optimization_profile": {k: {"batch": v["input_ids"][0], "sequence": v["input_ids"][1],
                                             "past": v["past_key_values.0.key"][2]} for k, v in shapes.items()},
                "quantized": state.handoff.quantized_summary(), "unquantized": state.handoff.unquantized,
                "float32_islands": state.handoff.float32_islands,
                "cpu_check_runtime": "onnxruntime CPUExecutionProvider, graph optimizations disabled",
                "cpu_check_int8": cpu_check_int8_note()}

    def load(self, directory: Path, threads: int) -> OnnxDecoder:
        return OnnxDecoder.from_path(Path(directory) / MODEL_FILE, threads=threads, optimize=False)
