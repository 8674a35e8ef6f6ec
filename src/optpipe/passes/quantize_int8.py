"""`quantize-int8`: INT8 for the ONNX CPU target, three modes.

- `weight-only` (default): per-block INT8 weights in MatMulNBits; with accuracy_level 4 the activations are
  quantized per block at run time and the product runs on u8/s8 VNNI instructions. Near-lossless on models
  with activation outliers, because no activation is quantized per tensor.
- `dynamic`: ONNX Runtime's dynamic quantization (MatMulInteger, u8 activations per tensor, s8 per-channel weights).
  In a streaming build the same arithmetic is written directly as `DynamicQuantizeMatMul` (the op ONNX Runtime
  fuses that pattern into) with symmetric s8 weights quantized while the artifact is written.
- `static`: ONNX Runtime's QDQ static quantization with calibration data (per-tensor activation scales,
  per-channel s8 weights); pair it with the `smoothquant` pass to tame activation outliers.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from .. import hw
from .. import lazy as _lazy
from .. import quant as _quant
from ..errors import BuildError
from ..layerwise import EffectiveWeight
from ..pipeline import ModelState, OrtQuantizePass, PassConfig, PassContext, PassResult, Patterns, calibrated_when
from ._nbits import quantize_matmuls, select_matmuls
from ._onnx import MS_DOMAIN, GraphEdit, ensure_opset, prefill_feeds


def _dequantized(r: dict) -> np.ndarray:
    return (r["q"].astype(np.float32) * r["scale"]).T  # [N, K]


class Int8Config(PassConfig):
    mode: Literal["weight-only", "dynamic", "static"] = "weight-only"
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="weight-only: block along K")
    zero_point: Literal["symmetric", "int", "float"] = "symmetric"
    scale_dtype: _quant.ScaleDtype = Field(description="weight-only: how block scales are stored")
    accuracy_level: Literal[0, 1, 4] = 4
    per_channel: bool = True
    reduce_range: Literal["auto", True, False] = Field(
        "auto", description="dynamic/static: 7-bit weights, so u8 x s8 products cannot saturate on CPUs without VNNI "
                            "(auto: on exactly those CPUs, detected at build time and recorded)")
    include: Patterns = Field(default_factory=list, description="regexes on MatMul node names; empty = all")
    exclude: Patterns = Field(default_factory=list)


class QuantizeInt8(OrtQuantizePass):
    name = "quantize-int8"
    Config = Int8Config

    needs = calibrated_when(mode="static")  # type: ignore[assignment]

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        if c.mode == "weight-only":
            changes, notes = quantize_matmuls(state, ctx, bits=8, block=c.block_size, scheme=c.zero_point,
                                              algorithm="rtn", accuracy_level=c.accuracy_level,
                                              include=c.include, exclude=c.exclude,
                                              scale_dtype=c.scale_dtype)
            return PassResult(changes["layers_quantized"] > 0, changes, notes)
        if c.mode == "dynamic" and _lazy.any_lazy(state.onnx_model):
            return self._dynamic_streaming(state)
        return self._ort(state, ctx)

    def _dynamic_streaming(self, state: ModelState) -> PassResult:
        """MatMul -> DynamicQuantizeMatMul with lazily quantized weights: symmetric s8 (scale max|w|/127 per
        output channel, or per tensor), as ONNX Runtime's quantize_dynamic writes them, computed at write time."""
        c = self.config
        model = state.onnx_model
        selected, skipped = select_matmuls(model, c.include, c.exclude)
        edit = GraphEdit(model)
        reduce_range = self._reduce_range()
        qmax = 64 if reduce_range else 127  # ORT's ranges: reduced [-64, 64], symmetric [-127, 127]
        for node in selected:
            src = edit.inits[node.input[1]]
            k, n = src.dims

            def quantize(src=src):
                w = _lazy.array(src)  # [K, N]
                scale = np.abs(w).max(0) if c.per_channel else np.abs(w).max(keepdims=True)
                scale = np.where(scale == 0, 1.0, scale / qmax).astype(np.float32)
                return {"q": np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8), "scale": scale}

            shared = _lazy.Shared(quantize, 2)
            ns = n if c.per_channel else 1
            base = node.name
            edit.new_inits += [_lazy.tensor(base + ".weight_s8", (k, n), np.int8, shared.part("q")),
                               _lazy.tensor(base + ".weight_scale", (ns,), np.float32, shared.part("scale")),
                               numpy_helper.from_array(np.zeros(ns, np.int8), base + ".weight_zero_point")]
            edit.new_nodes.append(helper.make_node(
                "DynamicQuantizeMatMul", [node.input[0], base + ".weight_s8", base + ".weight_scale",
                                          base + ".weight_zero_point"], list(node.output), name=base, domain=MS_DOMAIN))
            state.effective_weights[base] = EffectiveWeight(  # weights only: the per-tensor u8 input is not imitated
                lambda q=quantize: _dequantized(q()))
            edit.remove.add(id(node))
            edit.drop_inits.add(node.input[1])
        edit.commit()
        ensure_opset(model, MS_DOMAIN, 1)
        state.handoff.quantized.update(
            {n.name: "int8 dynamic (DynamicQuantizeMatMul, streaming)" for n in selected})
        return PassResult(bool(selected), {"layers_quantized": len(selected), "layers_skipped": len(skipped),
                                           "ops": {"DynamicQuantizeMatMul": len(selected)},
                                           "reduce_range": reduce_range, "skipped": skipped},
                          [f"{len(selected)} weights quantized while the artifact is written (streaming build)"])

    def _reduce_range(self) -> bool:
        """7-bit weights where the CPU has no VNNI (u8 x s8 int16 sums can saturate at full range)."""
        rr = self.config.reduce_range
        return hw.int8_dot_product() is None if rr == "auto" else rr

    def _ort(self, state: ModelState, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        c = self.config
        model = state.onnx_model
        if _lazy.any_lazy(model):
            raise BuildError(f"mode {c.mode} runs ONNX Runtime's quantizer over the whole model in memory, which the "
                             "streaming build does not have; use mode: weight-only or dynamic")
        selected, skipped = select_matmuls(model, c.include, c.exclude)
        names = [n.name for n in selected]
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="in.onnx.data", size_threshold=1024)
            reduce_range = self._reduce_range()
            common = dict(per_channel=c.per_channel, nodes_to_quantize=names, op_types_to_quantize=["MatMul"],
                          reduce_range=reduce_range,
                          use_external_data_format=True,
                          extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            if c.mode == "dynamic":
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, **common)
            else:
                windows = list(ctx.calibration_windows())

                class Reader(CalibrationDataReader):
                    def __init__(self):
                        self.it = iter(windows)

                    def get_next(self):
                        ids = next(self.it, None)
                        if ids is None:
                            return None
                        return prefill_feeds(model, ids)

                quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **common)
            out = onnx.load(str(dst))
        del out.metadata_props[:]
        out.metadata_props.extend(model.metadata_props)
        state.onnx_model = out
        kinds = {}
        for n in out.graph.node:
            if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"):
                kinds[n.op_type] = kinds.get(n.op_type, 0) + 1
        state.handoff.quantized.update({n: f"int8 {c.mode} (onnxruntime.quantization)" for n in names})
        dot = hw.int8_dot_product()
        return PassResult(True, {"layers_quantized": len(names), "layers_skipped": len(skipped), "ops": kinds,
                                 "reduce_range": reduce_range, "int8_dot_product": dot or "none (AVX2 vpmaddubsw)",
                                 "skipped": skipped},
                          [f"reduce_range={reduce_range} ({c.reduce_range}): the build CPU has "
                           f"{dot or 'no VNNI (u8 x s8 sums can saturate at full range)'}"])
