"""Small helpers for building and editing ONNX graphs (shared by the ONNX passes)."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
FN_DOMAIN = "optpipe"  # model-local functions emitted by `export`, replaced by `fuse`
OPSET = 21


class GraphBuilder:
    """Collects nodes and initializers with unique names; `op` returns the output name(s)."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._ids = itertools.count()
        self.prefix = prefix

    def _name(self, hint: str) -> str:
        return f"{self.prefix}{hint}_{next(self._ids)}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           domain: str = "", outputs: list[str] | None = None, **attrs):
        name = name or self._name(op_type)
        outs = outputs or [f"{name}/out{i}" if n_out > 1 else f"{name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def const(self, value, dtype=np.int64, name: str | None = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        out = name or self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], name=out + "/Constant",
                                           value=numpy_helper.from_array(arr, out)))
        return out

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


# how an op's output rank follows from its inputs': enough to follow a decoder's hidden states from input_ids to
# every linear (onnx shape inference stops at the contrib ops: normalizations, attention, MatMulNBits)
_RANK_OF_FIRST_INPUT = {"Sqrt", "Neg", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "QuickGelu", "Cast",
                        "Identity", "Softmax", "Split", "Concat", "LayerNormalization", "SimplifiedLayerNormalization",
                        "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "MatMulNBits",
                        "GroupQueryAttention", "MultiHeadAttention"}
_RANK_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "MatMul"}


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of the graph's tensors where they are declared (inputs, outputs, value_info, initializers) or follow
    from them through the ops above and Gather; other tensors (other ops or domains, a MatMul with a vector) are
    left out: unknown, never guessed."""
    g = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.output, *g.value_info]
             if v.type.tensor_type.HasField("shape")}
    ranks.update({t.name: len(t.dims) for t in g.initializer})
    for n in g.node:
        if (not n.output or n.output[0] in ranks or not n.input or n.input[0] not in ranks
                or n.domain not in ("", "ai.onnx", MS_DOMAIN)):
            continue
        inputs = [i for i in n.input if i]
        if n.op_type == "Gather" and inputs[1] in ranks:
            ranks[n.output[0]] = ranks[inputs[0]] + ranks[inputs[1]] - 1
        elif n.op_type in _RANK_OF_FIRST_INPUT:
            attention = n.op_type in ("GroupQueryAttention", "MultiHeadAttention")  # then its caches (rank 4)
            ranks.update({o: ranks[inputs[0]] for o in (n.output[:1] if attention else n.output) if o})
        elif n.op_type in _RANK_BROADCAST and all(i in ranks for i in inputs) and not (
                n.op_type == "MatMul" and min(ranks[i] for i in inputs) < 2):
            ranks[n.output[0]] = max(ranks[i] for i in inputs)
    return ranks


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def drop_unused_functions(model: onnx.ModelProto) -> None:
    used = {(n.domain, n.op_type) for n in model.graph.node}
    keep = [f for f in model.functions if (f.domain, f.name) in used]
    del model.functions[:]
    model.functions.extend(keep)
    if not any(f.domain == FN_DOMAIN for f in keep):
        keep_ops = [o for o in model.opset_import if o.domain != FN_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep_ops)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32


def toposort(model: onnx.ModelProto) -> None:
    """Re-order graph nodes so every input is produced before use (rewrites may insert out of order)."""
    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise ValueError(f"graph has unresolved inputs: {missing}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, **values) -> None:
    current = metadata(model)
    current.update({k.replace("__", "."): str(v) for k, v in values.items()})
    del model.metadata_props[:]
    for k, v in current.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def prefill_feeds(model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one prefill of `ids` with an empty cache (static caches get zeroed max_length buffers)."""
    meta = metadata(model)
    layers, kv, d = (int(meta[k]) for k in ("optpipe.num_layers", "optpipe.kv_num_heads", "optpipe.head_dim"))
    past = int(meta["optpipe.max_length"]) if meta.get("optpipe.kv_cache") == "static" else 0
    feeds = {"input_ids": ids.reshape(1, -1).astype(np.int64), "attention_mask": np.ones((1, ids.size), np.int64)}
    past_type = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past_key_values."))
    dtype = np.float16 if past_type == TensorProto.FLOAT16 else np.float32
    for i in range(layers):
        for kvn in ("key", "value"):
            feeds[f"past_key_values.{i}.{kvn}"] = np.zeros((1, kv, past, d), dtype)
    return feeds


class GraphEdit:
    """Batch edits to a graph: nodes to remove (by identity), nodes and initializers to add, initializers to drop.
    `commit` applies them, keeps dropped initializers that something still reads, and re-sorts the nodes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = initializer_map(model)
        self.prod = producers(model)
        self.cons = consumers(model)
        self.remove: set[int] = set()
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.drop_inits: set[str] = set()

    def array(self, name: str) -> np.ndarray:
        from .. import lazy as _lazy

        return _lazy.array(self.inits[name])

    def tensor(self, name: str) -> onnx.TensorProto:
        """An initializer of the graph or one added to this edit."""
        return self.inits[name] if name in self.inits else next(t for t in self.new_inits if t.name == name)

    def derived(self, new_name: str, shape, dtype, fn, names: list[str]) -> onnx.TensorProto:
        """fn(*arrays of initializers `names` (the graph's or ones added to this edit)) as a new initializer: computed
        now, or, if any of them is lazy, when it is written (a streaming build)."""
        from .. import lazy as _lazy

        srcs = [self.tensor(n) for n in names]
        shaped = lambda *a: np.asarray(fn(*a)).astype(dtype).reshape(shape)  # noqa: E731
        if any(_lazy.is_lazy(t) for t in srcs):
            return _lazy.derived(new_name, shape, dtype, shaped, *srcs)
        return numpy_helper.from_array(np.ascontiguousarray(shaped(*(numpy_helper.to_array(t) for t in srcs))),
                                       new_name)

    def concat(self, new_name: str, names: list[str], axis: int) -> onnx.TensorProto:
        """Initializers `names` concatenated; stays lazy (computed when written) if any of them is lazy."""
        srcs = [self.inits[n] for n in names]
        shape = list(srcs[0].dims)
        shape[axis] = sum(t.dims[axis] for t in srcs)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(srcs[0].data_type)
        return self.derived(new_name, shape, dtype, lambda *a: np.concatenate(a, axis=axis), names)

    def commit(self) -> None:
        nodes = [n for n in self.model.graph.node if id(n) not in self.remove] + self.new_nodes
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        read = {i for n in nodes for i in n.input}
        keep = [t for t in self.model.graph.initializer if t.name not in self.drop_inits or t.name in read]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep + self.new_inits)
        toposort(self.model)
