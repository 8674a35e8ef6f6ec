"""`quantize-int8`: INT8 for the ONNX CPU target, three modes.

- `weight-only` (default): per-block INT8 weights in MatMulNBits; with accuracy_level 4 the activations are
  quantized per block at run time and the product runs on u8/s8 VNNI instructions. Near-lossless on models
  with activation outliers, because no activation is quantized per tensor.
- `dynamic`: ONNX Runtime's dynamic quantization (MatMulInteger, u8 activations per tensor, s8 per-channel weights).
- `static`: ONNX Runtime's QDQ static quantization with calibration data (per-tensor activation scales,
  per-channel s8 weights); pair it with the `smoothquant` pass to tame activation outliers.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from ..errors import BuildError
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, register
from . import _lazy
from ._nbits import quantize_matmuls, select_matmuls
from ._onnx import prefill_feeds


class Int8Config(PassConfig):
    mode: Literal["weight-only", "dynamic", "static"] = "weight-only"
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="weight-only: block along K")
    zero_point: Literal["symmetric", "int", "float"] = "symmetric"
    accuracy_level: Literal[0, 1, 4] = 4
    per_channel: bool = True
    include: list[str] = Field(default_factory=list, description="regexes on MatMul node names; empty = all")
    exclude: list[str] = Field(default_factory=list)


@register
class QuantizeInt8(Pass):
    name = "quantize-int8"
    Config = Int8Config
    requires = frozenset({"onnx"})
    provides = frozenset({"quantized"})
    targets = frozenset({"cpu-onnx"})

    @property
    def needs(self):  # type: ignore[override]
        return frozenset({"calibration"}) if self.config.mode == "static" else frozenset()

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        if c.mode == "weight-only":
            changes, notes = quantize_matmuls(state, ctx, bits=8, block=c.block_size, scheme=c.zero_point,
                                              algorithm="rtn", accuracy_level=c.accuracy_level,
                                              include=c.include, exclude=c.exclude)
            return PassResult(changes["layers_quantized"] > 0, changes, notes)
        return self._ort(state, ctx)

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
                             "streaming build does not have; use mode: weight-only")
        selected, skipped = select_matmuls(model, c.include, c.exclude)
        names = [n.name for n in selected]
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="in.onnx.data", size_threshold=1024)
            common = dict(per_channel=c.per_channel, nodes_to_quantize=names, op_types_to_quantize=["MatMul"],
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
        state.info.setdefault("quantized", {}).update({n: f"int8 {c.mode} (onnxruntime.quantization)" for n in names})
        return PassResult(True, {"layers_quantized": len(names), "layers_skipped": len(skipped), "ops": kinds,
                                 "skipped": skipped}, [])
