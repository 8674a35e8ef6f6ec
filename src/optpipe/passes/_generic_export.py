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
import onnx_ir as ir
import torch
from onnx_ir.passes.common import ClearMetadataAndDocStringPass, RemoveUnusedNodesPass

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
    _name_weights(program.model)
    return program.model_proto


LINEAR_CLASSES = (".Linear", ".Conv1D")  # torch's, and GPT-2's transposed linear (transformers.pytorch_utils)


def _module_of(node: ir.Node) -> str | None:
    """The linear module a node was traced from (its module path in the HF model), from the exporter's metadata."""
    meta = node.metadata_props
    try:
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        classes = ast.literal_eval(meta["pkg.torch.onnx.class_hierarchy"])
    except (KeyError, ValueError, SyntaxError):
        return None
    if len(scopes) < 2 or len(classes) < 2 or not str(classes[-2]).endswith(LINEAR_CLASSES):
        return None
    return str(scopes[-2]).removeprefix(_WRAPPER + ".")


def _is_linear_gemm(node: ir.Node) -> bool:
    a = node.attributes
    return (node.op_type == "Gemm" and a.get_float("alpha", 1.0) == 1.0 and a.get_float("beta", 1.0) == 1.0
            and not a.get_int("transA", 0) and node.inputs[1].is_initializer() and _module_of(node) is not None)


def _split_gemm(graph: ir.Graph, gemm: ir.Node) -> None:
    """A Gemm of a linear module becomes MatMul + Add, the form the quantize passes rewrite: GPT-2's Conv1D traces
    to A @ B + C (B a stored [in, out] weight), an nn.Linear on 2-D hidden states (OPT's MLP) to A @ W^T + C,
    whose W^T is then stored as the module's own [in, out] weight, as a tied head's is (it was left unquantized)."""
    x, w, *bias = gemm.inputs
    out = gemm.outputs[0].name
    nodes = []
    if gemm.attributes.get_int("transB", 0):
        nodes.append(ir.node("Transpose", [w], {"perm": [1, 0]}, outputs=[ir.val(out + "/weight_t")]))
        w = nodes[-1].outputs[0]
    meta = dict(gemm.metadata_props)  # the same module: the MatMul and the Add are named after it below
    nodes.append(ir.node("MatMul", [x, w], outputs=[ir.val(out + "/matmul")], metadata_props=meta))
    if bias and bias[0] is not None:
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias[0]], metadata_props=meta))
    graph.insert_before(gemm, nodes)
    ir.convenience.replace_all_uses_with(gemm.outputs[0], nodes[-1].outputs[0], replace_graph_outputs=True)
    graph.remove(gemm, safe=True)
    last = nodes[-1].outputs[0]
    last.name, last.type, last.shape = out, gemm.outputs[0].type, gemm.outputs[0].shape


def _name_weights(model: ir.Model) -> None:
    """Rename weight MatMuls (and their bias Adds) after their modules; store each weight as `<module>.weight_t`
    ([in, out], used by that MatMul alone); materialize a transposed shared weight (a tied head) as its own copy.
    Drops the exporter's per-node metadata (stack traces of the machine that built it)."""
    graph = model.graph
    for gemm in [n for n in graph if _is_linear_gemm(n)]:
        _split_gemm(graph, gemm)
    taken: set[str] = set()
    for node in graph:
        module = _module_of(node)
        if module is None:
            continue
        if node.op_type == "Add":
            node.name = module + ".bias_add"
            continue
        if node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        name = module if module not in taken else f"{module}.{len(taken)}"
        taken.add(name)
        node.name = name
        w, weight = node.inputs[1], name + ".weight_t"
        if w.is_initializer() and len(w.const_value.shape) == 2 and len(w.uses()) == 1:
            w.name = weight
            continue
        tr = w.producer()
        src = tr.inputs[0] if tr is not None and tr.op_type == "Transpose" else None
        if (src is not None and src.is_initializer() and len(src.const_value.shape) == 2
                and list(tr.attributes.get_ints("perm", [1, 0])) == [1, 0]):
            copy = ir.val(weight, const_value=ir.tensor(np.ascontiguousarray(src.const_value.numpy().T), name=weight))
            graph.register_initializer(copy)
            node.replace_input_with(1, copy)
    RemoveUnusedNodesPass()(model)  # transposes now read by no one, initializers left without a reader
    ClearMetadataAndDocStringPass()(model)


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
