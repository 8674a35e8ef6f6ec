"""What an artifact spends on its weights, read from what it stores (tensor headers, never the weights): for each
weight-holding layer its precision, its parameters (the float matrix it stands for) and its stored bytes (codes,
scales, zero points, block sums: everything the layer reads), summed per tensor class (embedding, head, each
projection type) and per precision, and bits per weight (stored bits / parameters) overall and per class.

A tensor read by two layers (a tied embedding and head) is counted once, under the first that reads it; the
parameters of a tied matrix are counted once too. Everything else the model stores (norm weights, rotary tables)
is listed apart: `other_bytes` (and in the overall figure as llama.cpp counts a file: all stored bytes over all
parameters, norms included)."""
from __future__ import annotations

import re
from dataclasses import dataclass

# tensor class -> the module-path pattern that marks it (first match wins)
CLASSES = (
    ("embedding", r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)(\.|/|$)"),
    ("head", r"(^|\.)(lm_head|embed_out|output)(\.|/|_|$)"),
    ("qkv_proj", r"(^|\.)(qkv_proj|query_key_value|c_attn|Wqkv)(\.|/|$)"),
    ("q_proj", r"(^|\.)q_proj(\.|/|$)"), ("k_proj", r"(^|\.)k_proj(\.|/|$)"), ("v_proj", r"(^|\.)v_proj(\.|/|$)"),
    ("o_proj", r"(^|\.)(o_proj|out_proj|dense|c_proj)(\.|/|$)"),
    ("gate_up_proj", r"(^|\.)gate_up_proj(\.|/|$)"), ("gate_proj", r"(^|\.)gate_proj(\.|/|$)"),
    ("up_proj", r"(^|\.)(up_proj|fc1|c_fc|dense_h_to_4h)(\.|/|$)"),
    ("down_proj", r"(^|\.)(down_proj|fc2|dense_4h_to_h)(\.|/|$)"),
)
_COMPILED = [(c, re.compile(p)) for c, p in CLASSES]


def tensor_class(name: str) -> str:
    return next((c for c, p in _COMPILED if p.search(name)), "other_linear")


@dataclass
class Stored:
    """One weight-holding layer of an artifact."""

    name: str
    precision: str  # "int4", "int8", "float32", ...
    parameters: int  # elements of the float matrix the layer stands for
    bytes: int  # stored bytes the layer reads (each tensor counted once in the artifact)


def summarize(layers: list[Stored], other_bytes: int = 0, other_parameters: int = 0, tied: bool = False) -> dict:
    """The manifest's `storage` record: bits per weight overall, per class and per precision, with the bytes.
    `tied`: the head and the embedding are one matrix of the model, so its parameters count once overall (each
    class row still gives the bits its own stored copy spends)."""
    def bpw(b: int, p: int) -> float | None:
        return round(8 * b / p, 4) if p else None

    by_class: dict[str, dict] = {}
    by_precision: dict[str, dict] = {}
    for s in layers:
        for table, key in ((by_class, tensor_class(s.name)), (by_precision, s.precision)):
            row = table.setdefault(key, {"layers": 0, "parameters": 0, "bytes": 0})
            row["layers"] += 1
            row["parameters"] += s.parameters
            row["bytes"] += s.bytes
    for table in (by_class, by_precision):
        for row in table.values():
            row["bits_per_weight"] = bpw(row["bytes"], row["parameters"])
    params = sum(s.parameters for s in layers)
    if tied and "head" in by_class and "embedding" in by_class:
        params -= min(by_class["head"]["parameters"], by_class["embedding"]["parameters"])
    stored = sum(s.bytes for s in layers)
    return {
        "bits_per_weight": bpw(stored + other_bytes, params + other_parameters),
        "bits_per_weight_layers": bpw(stored, params),
        "parameters": params + other_parameters, "layer_parameters": params,
        "bytes": stored + other_bytes, "layer_bytes": stored, "other_bytes": other_bytes,
        "tied_embeddings": tied,
        "by_class": dict(sorted(by_class.items())), "by_precision": dict(sorted(by_precision.items())),
    }


# -- ONNX ---------------------------------------------------------------------------------------------------------

_WEIGHT_OPS = ("MatMulNBits", "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
               "Gather", "GatherBlockQuantized")


def _tensor_bytes(t) -> int:
    """Stored bytes of an initializer, from its header (external data's `length`, else the proto's own data)."""
    import onnx

    ext = {e.key: e.value for e in t.external_data}
    if "length" in ext:
        return int(ext["length"])
    if t.raw_data:
        return len(t.raw_data)
    n = _numel(t)
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    if bits:
        return (n * bits + 7) // 8
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def onnx_storage(model) -> dict:
    """`summarize` of an ONNX model loaded without its external data (`onnx.load(..., load_external_data=False)`)."""
    import onnx

    from .ort_decoder import graph_precisions

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    precisions = graph_precisions(model)
    taken: set[str] = set()

    def constants(name: str, seen: set) -> list[str] | None:
        """The initializers `name` is computed from when it is computed from initializers alone (a Cast of stored
        scales, a Transpose of the head), else None (an activation)."""
        if name in inits:
            return [name]
        node = producer.get(name)
        if node is None or name in seen:
            return None
        if node.op_type == "Constant":
            return []
        seen.add(name)
        out: list[str] = []
        for i in filter(None, node.input):
            got = constants(i, seen)
            if got is None:
                return None
            out += got
        return out

    def weight_inputs(n) -> list[str]:
        """The inputs of a weight-holding node that are (or derive from) stored tensors, not its activation."""
        if n.op_type == "Gather":
            return [n.input[0]]
        if n.op_type == "GatherBlockQuantized":  # data, indices, scales, zero points
            return [n.input[0], *n.input[2:]]
        return list(n.input[1:])

    def logical_k(n, k: int, block: int) -> int:
        """The weight's own K: a float-zero-point weight in its integer form reads [x, s, ...] (x's block sums once
        per remainder digit), so the kernel's K also counts the digit blocks, which are storage, not parameters."""
        a = producer.get(n.input[0])
        if a is None or a.op_type != "Concat" or not a.name.endswith("/with_block_sums"):
            return k
        digits = len(a.input) - 1
        return next((nb * block for nb in range(k // block, 0, -1) if (nb + digits * -(-nb // block)) * block == k), k)

    layers = []
    # matmuls first: a tied embedding's lookup that reads the head's blocks is then the one counted as reading again
    for n in sorted((n for n in g.node if n.op_type in _WEIGHT_OPS), key=lambda n: n.op_type.startswith("Gather")):
        sources = [c for i in weight_inputs(n) if i for c in (constants(i, set()) or [])]
        if not sources:
            continue
        attrs = {a.name: a for a in n.attribute}
        bits = attrs["bits"].i if "bits" in attrs else 4
        if n.op_type == "MatMulNBits":
            params = logical_k(n, attrs["K"].i, attrs["block_size"].i) * attrs["N"].i
        elif n.op_type == "GatherBlockQuantized":
            data = inits[sources[0]]
            # a lookup of the tied head's stored codes: the matrix and its parameters are the head's (counted there;
            # the codes are in the kernel's layout, remainder digits included)
            params = 0 if sources[0] in taken else \
                _numel(data) * (8 // bits if data.data_type == onnx.TensorProto.UINT8 else 1)
        else:
            params = max(_numel(inits[s]) for s in sources)
        new = [s for s in dict.fromkeys(sources) if s not in taken]
        if not new:  # a tied matrix read again (the embedding's lookup of the head's codes): counted once
            continue
        taken.update(new)
        if n.op_type == "GatherBlockQuantized":
            precision = f"int{bits}"
        else:
            precision = precisions.get(n.name) or onnx.helper.tensor_dtype_to_np_dtype(inits[sources[0]].data_type).name
        layers.append(Stored(n.name or sources[0], precision, params, sum(_tensor_bytes(inits[s]) for s in new)))
    rest = [t for name, t in inits.items() if name not in taken]
    norms = [t for t in rest if re.search(r"norm", t.name, re.IGNORECASE)]
    tied = {p.key: p.value for p in model.metadata_props}.get("optpipe.tied_embeddings") == "1"
    return summarize(layers, other_bytes=sum(_tensor_bytes(t) for t in rest),
                     other_parameters=sum(_numel(t) for t in norms), tied=tied)


# -- PyTorch ------------------------------------------------------------------------------------------------------

def torch_storage(model) -> dict:
    """`summarize` of a torch model as the cpu-torch runtime holds it (quantized modules' buffers, float linears,
    embeddings), each tensor's storage counted once."""
    import torch

    from .torch_modules import Int4WeightOnlyLinear, Int8Linear, _is_conv1d

    seen: set[int] = set()

    def nbytes(tensors) -> int:
        out = 0
        for t in tensors:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            out += t.numel() * t.element_size()
        return out

    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, Int4WeightOnlyLinear):
            params = mod.out_features * mod.in_features
            layers.append(Stored(name, "int4", params, nbytes([mod.qweight, mod.scales, mod.zeros,
                                                                getattr(mod, "bias", None)])))
        elif isinstance(mod, Int8Linear):
            layers.append(Stored(name, "int8", mod.qweight.numel(), nbytes([mod.qweight, mod.scales,
                                                                            getattr(mod, "bias", None)])))
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) or _is_conv1d(mod):
            if mod.weight.data_ptr() in seen:
                continue  # a tied head: the embedding's matrix, counted once
            layers.append(Stored(name, str(mod.weight.dtype).removeprefix("torch."), mod.weight.numel(),
                                 nbytes([mod.weight, getattr(mod, "bias", None)])))
    rest = [t for t in list(model.parameters()) + list(model.buffers()) if t.data_ptr() not in seen]
    norms = [p for n, p in model.named_parameters() if "norm" in n.lower() and p.data_ptr() not in seen]
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return summarize(layers, other_bytes=nbytes(rest), other_parameters=sum(p.numel() for p in norms), tied=tied)


STORAGE_COLUMNS = ["tensors", "layers", "parameters", "MB", "bits/weight"]


def storage_rows(storage: dict) -> list[list]:
    """Per class, per precision and overall rows for a table (report.md, report.html, `inspect`)."""
    def bits(v):  # a layer that only re-reads another's matrix (a tied lookup) has no parameters of its own
        return v["bits_per_weight"] if v["bits_per_weight"] is not None else "(reads the head's matrix)"

    rows = [[f"class {k}", v["layers"], v["parameters"], round(v["bytes"] / 1e6, 3), bits(v)]
            for k, v in storage["by_class"].items()]
    rows += [[f"precision {k}", v["layers"], v["parameters"], round(v["bytes"] / 1e6, 3), bits(v)]
             for k, v in storage["by_precision"].items()]
    rows.append(["other stored tensors (norms, rotary tables)", "", "", round(storage["other_bytes"] / 1e6, 3), ""])
    rows.append(["all (as a file size over the model's parameters)", "", storage["parameters"],
                 round(storage["bytes"] / 1e6, 3), storage["bits_per_weight"]])
    return rows
