"""The generic export route: trace any transformers decoder with `torch.onnx.export(dynamo=True)` and give the graph
the interface the family route writes (`input_ids`, `attention_mask`, `past_key_values.<i>.key|value` in;
`logits`, `present.<i>.key|value` out; batch 1), so the same runtime, quantize passes and gates serve it.

Used for a model whose family has no architecture description (or when a recipe forces it). Nothing here knows a
layer's shape: the model's own forward is traced with a `DynamicCache`, and onnxscript's optimizer (run by the
exporter) folds constants. Afterwards each weight MatMul is renamed after its `nn.Linear` (the exporter records the
module path on every node), its weight stored as `<module>.weight_t`, and a tied head's transposed embedding is
materialized as a weight of its own, so `include`/`exclude` patterns and GPTQ see the same names as on the family
route. It is slower than a family's fused graph: `fuse` and `static-kv-cache` need the family route.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import warnings

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..runtime.torch_modules import cache_keyword, output_cache

_WRAPPER = "model"  # the wrapper's attribute holding the HF model: the first scope of every module path


class _FlatCache(torch.nn.Module):
    """The HF model with its KV cache as flat tensors (what ONNX inputs and outputs can be)."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        # full layers, never the config's sliding-window ones: rebuilt from the past tensors at every step, a sliding
        # layer would keep only its window and count the positions it kept as all it has seen, so decoding past the
        # window took wrong positions (a Starcoder2 with a 16-token window parted from transformers' tokens at the
        # 22nd); the model's own mask applies the window to the full cache
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{cache_keyword(self.model.forward): cache})  # `cache` since transformers 5.x
        flat = []
        for layer in output_cache(out).layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


@contextlib.contextmanager
def _quiet():
    """The exporter logs optional-package notes (torchvision ops) and deprecation warnings into build logs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim), read from the cache of a one-token forward rather than from config names
    (families spell them differently). The runtime keeps one [1, heads, length, dim] buffer per key and value:
    a model whose layers or keys and values differ in shape is refused."""
    with torch.no_grad():
        cache = output_cache(model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=True))
    shapes = {tuple(t.shape) for layer in cache.layers for t in (layer.keys, layer.values)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"its KV cache is not one [1, heads, length, dim] shape for every layer, key and value "
                         f"(found {sorted(shapes)}); the runtime cannot hold it")
    _, kv, _, head_dim = next(iter(shapes))
    return len(cache.layers), int(kv), int(head_dim)


def trace(model, opset: int, shape: tuple[int, int, int]) -> onnx.ModelProto:
    """Dynamo-export `model` with a KV cache of `shape` (`cache_shape`); dynamic sequence, past and total lengths
    (batch 1)."""
    layers, kv, head_dim = shape
    names = [f"past_key_values.{i}.{kv_}" for i in range(layers) for kv_ in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv_}" for i in range(layers) for kv_ in ("key", "value")]
    ids = torch.zeros((1, 4), dtype=torch.long)
    mask = torch.ones((1, 7), dtype=torch.long)
    past = [torch.zeros((1, kv, 3, head_dim), dtype=torch.float32) for _ in names]
    seq, past_len, total = torch.export.Dim("sequence"), torch.export.Dim("past_sequence"), torch.export.Dim(
        "total_sequence")
    dynamic = {"input_ids": {1: seq}, "attention_mask": {1: total}, "past": tuple({2: past_len} for _ in names)}
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(_FlatCache(model, layers).eval(), (ids, mask, *past), dynamo=True, opset_version=opset,
                                    input_names=["input_ids", "attention_mask", *names], output_names=outputs,
                                    dynamic_shapes=dynamic, optimize=True, verbose=False)
    proto = program.model_proto
    _name_weights(proto)
    return proto


LINEAR_CLASSES = (".Linear", ".Conv1D")  # torch's, and GPT-2's transposed linear (transformers.pytorch_utils)


def _module_of(node: onnx.NodeProto) -> str | None:
    """The linear module a node was traced from (its module path in the HF model), from the exporter's metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        classes = ast.literal_eval(meta["pkg.torch.onnx.class_hierarchy"])
    except (KeyError, ValueError, SyntaxError):
        return None
    if len(scopes) < 2 or len(classes) < 2 or not str(classes[-2]).endswith(LINEAR_CLASSES):
        return None
    return str(scopes[-2]).removeprefix(_WRAPPER + ".")


def _split_gemms(graph: onnx.GraphProto, inits: dict) -> None:
    """A Gemm of a linear module becomes MatMul + Add, the form the quantize passes rewrite: GPT-2's Conv1D traces
    to A @ B + C (B a stored [in, out] weight), an nn.Linear on 2-D hidden states (OPT's MLP) to A @ W^T + C,
    whose W^T is then stored as the module's own [in, out] weight, as a tied head's is (it was left unquantized)."""
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if not (node.op_type == "Gemm" and plain and node.input[1] in inits and _module_of(node) is not None):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            nodes.append(helper.make_node("Transpose", [node.input[1]], [node.output[0] + "/weight_t"], perm=[1, 0]))
            node.input[1] = nodes[-1].output[0]
        nodes.append(node)
        out, bias = node.output[0], node.input[2] if len(node.input) > 2 else ""
        node.op_type = "MatMul"
        del node.attribute[:]
        del node.input[2:]
        if bias:
            node.output[0] = out + "/matmul"
            add = helper.make_node("Add", [out + "/matmul", bias], [out])
            add.metadata_props.extend(node.metadata_props)  # the same module: named `<module>.bias_add` below
            nodes.append(add)
    del graph.node[:]
    graph.node.extend(nodes)


def _name_weights(model: onnx.ModelProto) -> None:
    """Rename weight MatMuls (and their bias Adds) after their modules; store each weight as `<module>.weight_t`
    ([in, out], used by that MatMul alone); materialize a transposed shared weight (a tied head) as its own copy.
    Drops the exporter's per-node metadata (stack traces of the machine that built it)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    _split_gemms(graph, inits)
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    taken: set[str] = set()
    dropped: set[int] = set()
    for node in graph.node:
        module = _module_of(node)
        if module is None:
            continue
        if node.op_type == "Add":
            node.name = module + ".bias_add"
            continue
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        name = module if module not in taken else f"{module}.{len(taken)}"
        taken.add(name)
        node.name = name
        w, weight = node.input[1], name + ".weight_t"
        if w in inits and len(inits[w].dims) == 2 and uses.get(w) == 1:
            inits[w].name = weight
            node.input[1] = weight
            continue
        tr = producer.get(w)
        if tr is not None and tr.op_type == "Transpose" and tr.input[0] in inits and len(inits[tr.input[0]].dims) == 2:
            perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0])
            if perm == [1, 0]:
                graph.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(numpy_helper.to_array(inits[tr.input[0]]).T), weight))
                node.input[1] = weight
                uses[w] -= 1
                if uses[w] == 0:
                    dropped.add(id(tr))
    if dropped:
        keep = [n for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(keep)
    for node in graph.node:
        del node.metadata_props[:]
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    keep_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)


def metadata(config, shape: tuple[int, int, int], max_positions: int) -> dict[str, str]:
    """What the runtime and later passes read from a generic graph (no family, no rotary table). Its length limit is
    also the config's: learned positions (OPT, GPT-2) end there, and ONNX Runtime failed past it on a raw Gather."""
    layers, kv, head_dim = shape
    max_positions = min(max_positions, getattr(config, "max_position_embeddings", None) or max_positions)
    return {"optpipe.num_layers": str(layers), "optpipe.num_heads": str(int(config.num_attention_heads)),
            "optpipe.kv_num_heads": str(kv), "optpipe.head_dim": str(head_dim),
            "optpipe.vocab_size": str(int(config.vocab_size)), "optpipe.kv_cache": "dynamic",
            "optpipe.max_length": str(max_positions), "optpipe.model_type": str(config.model_type),
            "optpipe.family": "", "optpipe.export_route": "generic",
            "optpipe.tied_embeddings": str(int(bool(getattr(config, "tie_word_embeddings", False))))}
