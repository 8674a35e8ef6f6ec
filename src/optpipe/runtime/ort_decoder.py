"""ONNX Runtime decoding for graphs written by `export` (batch 1): shared by the `cpu-onnx` target's runner
and by passes that need to run a graph (the export check, calibration), so neither reaches into the other.

The decode loop binds inputs and outputs with IOBinding so the KV cache stays in ONNX Runtime's memory:
with a static cache (see the `static-kv-cache` pass) past and present are the *same* preallocated buffer,
so a decode step neither reallocates nor copies the cache; with a dynamic cache the present tensors of one
step are bound as the past of the next without a round trip through numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .generation import Generation, OnToken, Pick, decode


def session_options(threads: int, optimize: bool | str = True):
    """`optimize`: True = every ONNX Runtime graph optimization (how artifacts run); "basic" = constant folding
    and other rewrites that keep each op's arithmetic; False = none (TensorRT-bound graphs, run as written). A
    cpu-onnx graph needs at least "basic": its float16-stored scales reach MatMulNBits through a Cast that ONNX
    Runtime must fold, since accuracy_level 4 packs scales only from constants (unfolded, it computes garbage)."""
    import onnxruntime as ort

    levels = {True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[optimize]
    so.log_severity_level = 3
    return so


@dataclass
class _Layout:
    layers: int
    kv_heads: int
    head_dim: int
    static: bool
    max_length: int

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "_Layout":
        return cls(int(meta["optpipe.num_layers"]), int(meta["optpipe.kv_num_heads"]), int(meta["optpipe.head_dim"]),
                   meta.get("optpipe.kv_cache", "dynamic") == "static", int(meta["optpipe.max_length"]))


class OnnxDecoder:
    """Batch-1 decoder over an exported graph; `prefill`/`step` keep the cache as OrtValues."""

    def __init__(self, session, layout: _Layout, graph=None):
        import onnxruntime as ort

        self._graph = graph  # the ModelProto or the path it was loaded from (for `precisions`)
        self.ort = ort
        self.session = session
        self.layout = layout
        self._reopen = None  # threads -> the same model in a new session (set by from_path / from_proto)
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(layout.layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(layout.layers) for kv in ("key", "value")]
        types = {o.name: o.type for o in list(session.get_inputs()) + list(session.get_outputs())}
        self.cache_dtype = np.float16 if types[self.past_names[0]] == "tensor(float16)" else np.float32
        vocab = session.get_outputs()[0].shape[-1]
        logits_dtype = np.float16 if types["logits"] == "tensor(float16)" else np.float32
        self._step_logits_np = np.zeros((1, 1, vocab), logits_dtype)
        self._step_logits = ort.OrtValue.ortvalue_from_numpy(self._step_logits_np)
        self._mask = np.ones((1, layout.max_length if layout.static else 4096), dtype=np.int64)

    @classmethod
    def from_proto(cls, model: onnx.ModelProto, threads: int = 1, optimize: bool = True) -> "OnnxDecoder":
        import onnxruntime as ort

        meta = {p.key: p.value for p in model.metadata_props}
        sess = ort.InferenceSession(model.SerializeToString(), session_options(threads, optimize),
                                    providers=["CPUExecutionProvider"])
        out = cls(sess, _Layout.from_metadata(meta), model)
        out._reopen = lambda n: cls.from_proto(model, n, optimize)
        return out

    @classmethod
    def from_path(cls, path: Path, threads: int = 1, optimize: bool = True) -> "OnnxDecoder":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), session_options(threads, optimize), providers=["CPUExecutionProvider"])
        out = cls(sess, _Layout.from_metadata(sess.get_modelmeta().custom_metadata_map), Path(path))
        out._reopen = lambda n: cls.from_path(path, n, optimize)
        return out

    def with_threads(self, threads: int) -> "OnnxDecoder":
        """The same model at another thread count: a new session (ONNX Runtime fixes the count per session)."""
        reopen = self._reopen
        if reopen is None:
            raise ValueError("this decoder was built from a session; it cannot be reopened at another thread count")
        return reopen(threads)

    # -- cache ---------------------------------------------------------------------------------
    def new_cache(self) -> list:
        L = self.layout
        length = L.max_length if L.static else 0
        shape = (1, L.kv_heads, length, L.head_dim)
        return [self.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_dtype)) for _ in self.past_names]

    def _run(self, ids: np.ndarray, total: int, state: dict) -> tuple[np.ndarray, dict]:
        """One forward. Logits are bound first, so they are always output 0. With a static cache the decode
        binding (cache + a preallocated logits buffer) is built once and reused for every step."""
        cache = state["cache"]
        step = ids.shape[1] == 1
        b = state.get("binding") if (self.layout.static and step) else None
        if b is None:
            b = self.session.io_binding()
            if step:
                b.bind_ortvalue_output("logits", self._step_logits)
            else:
                b.bind_output("logits", "cpu")
            for name, value in zip(self.past_names, cache):
                b.bind_ortvalue_input(name, value)
            for name, value in zip(self.present_names, cache):
                if self.layout.static:
                    b.bind_ortvalue_output(name, value)  # same buffer as the past: updated in place
                else:
                    b.bind_output(name, "cpu")
        b.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        b.bind_cpu_input("attention_mask", self._mask[:, :total] if total <= self._mask.shape[1]
                         else np.ones((1, total), dtype=np.int64))
        self.session.run_with_iobinding(b)
        outs = None if (step and self.layout.static) else b.get_outputs()
        logits = self._step_logits_np[0].astype(np.float32) if step else outs[0].numpy()[0].astype(np.float32, copy=False)
        if self.layout.static:
            return logits, {"cache": cache, "binding": b if step else None}
        return logits, {"cache": list(outs[1:])}

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict]:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if self.layout.static and ids.shape[1] > self.layout.max_length:
            raise ValueError(f"{ids.shape[1]} tokens exceed the static cache of {self.layout.max_length}")
        logits, state = self._run(ids, ids.shape[1], {"cache": self.new_cache()})
        return logits, {**state, "length": ids.shape[1]}

    def step(self, ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = state["length"] + ids.shape[1]
        if self.layout.static and total > self.layout.max_length:
            raise ValueError(f"sequence of {total} tokens exceeds the static cache of {self.layout.max_length}")
        logits, new_state = self._run(ids, total, state)
        return logits, {**new_state, "length": total}

    # -- Runner API ----------------------------------------------------------------------------
    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.prefill(ids)[0]

    @property
    def max_length(self) -> int:
        return self.layout.max_length

    def _header(self) -> onnx.ModelProto:
        """The graph without its weights (tensor headers only)."""
        return self._graph if isinstance(self._graph, onnx.ModelProto) else \
            onnx.load(str(self._graph), load_external_data=False)

    def precisions(self) -> dict[str, str]:
        return graph_precisions(self._header())

    def storage(self) -> dict:
        """Bytes and bits per weight of what the graph stores (runtime/storage.py)."""
        from .storage import onnx_storage

        return onnx_storage(self._header())

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None,
                 pick: Pick | None = None, on_token: OnToken | None = None) -> Generation:
        held: dict = {}
        nxt = np.empty((1, 1), dtype=np.int64)

        def prefill():
            logits, held["state"] = self.prefill(ids)
            return logits[-1]

        def step(tok, _position):
            nxt[0, 0] = tok
            logits, held["state"] = self.step(nxt, held["state"])
            return logits[-1]

        return decode(prefill, step, np.asarray(ids).size, max_new_tokens, eos_token_id, pick, on_token)


_INT_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8", onnx.TensorProto.INT4: "int4",
              onnx.TensorProto.UINT4: "int4"}
_QUANTIZED_MATMULS = {"DynamicQuantizeMatMul": "int8", "MatMulInteger": "int8", "MatMulIntegerToFloat": "int8"}


def graph_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul-like node -> the precision of its weight: MatMulNBits int<bits>, the dynamic/static int8 ops, a
    MatMul fed by DequantizeLinear of an integer initializer (QDQ), or the float dtype of a plain weight."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    dq_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            out[n.name] = f"int{bits}"
        elif n.op_type in _QUANTIZED_MATMULS:
            out[n.name] = _QUANTIZED_MATMULS[n.op_type]
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) > 1:
            w = n.input[1]
            if w in dq_source and inits.get(dq_source[w]) in _INT_TYPES:
                out[n.name] = _INT_TYPES[inits[dq_source[w]]]
            elif w in inits:
                out[n.name] = onnx.helper.tensor_dtype_to_np_dtype(inits[w]).name
    # a helper MatMul of a quantized layer is part of it (session 15's artifacts took a float-zero-point kernel's
    # block sums as `<layer>/block_sums`, x @ a 0/1 matrix; newer ones build them without a MatMul)
    return {k: v for k, v in out.items() if not (k.rsplit("/", 1)[0] in out and k.rsplit("/", 1)[0] != k)}
