"""`static-kv-cache`: one preallocated KV buffer of `max_length` per layer, shared between past and present.

GroupQueryAttention writes the new keys/values into the buffer in place when the past and present are
bound to the same memory, so a decode step neither reallocates nor copies the cache. The pass fixes the
cache axis of the graph's I/O to `max_length` and records the layout in the model's metadata, which is
what the runner reads to bind the shared buffers.
"""
from __future__ import annotations

from pydantic import Field

from ..errors import BuildError
from ..handoff import KVCacheLayout
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, check_cache_length
from ._onnx import initializer_map, metadata, set_metadata


class StaticKVConfig(PassConfig):
    max_length: int = Field(2048, ge=16, description="prompt + generated tokens the buffer holds")


class StaticKVCache(Pass):
    name = "static-kv-cache"
    streams = True
    Config = StaticKVConfig
    requires = frozenset({"fused-attention"})
    provides = frozenset({"static-kv-cache"})
    targets = frozenset({"cpu-onnx"})
    once = True

    def check_recipe(self, recipe, facts, earlier) -> None:
        export = next((p for p in earlier if p.name == "export"), None)
        limit = export.config.max_positions if export is not None else None
        check_cache_length(self.config.max_length, recipe, limit, "export.max_positions (the rotary table)")

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.onnx_model
        n = self.config.max_length
        limit = int(metadata(model)["optpipe.max_length"])
        cos = initializer_map(model).get("cos_cache")
        if n > limit:
            raise BuildError(f"max_length {n} exceeds the rotary cache of {limit} positions (export.max_positions)")
        if not any(x.op_type == "GroupQueryAttention" for x in model.graph.node):
            raise BuildError("no GroupQueryAttention in the graph: run `fuse` with attention: true first")
        changed = 0
        for vi in list(model.graph.input) + list(model.graph.output):
            if vi.name.startswith(("past_key_values.", "present.")):
                vi.type.tensor_type.shape.dim[2].Clear()
                vi.type.tensor_type.shape.dim[2].dim_value = n
                changed += 1
        set_metadata(model, **{"optpipe__kv_cache": "static", "optpipe__max_length": n})
        state.handoff.kv_cache = KVCacheLayout("static", n)
        layers = int(metadata(model)["optpipe.num_layers"])
        return PassResult(True, {"buffers": changed // 2, "layers": layers, "max_length": n,
                                 "rotary_positions": int(cos.dims[0]) if cos is not None else None})
