"""`export`: build an ONNX decoder graph (with KV cache) from a Llama-family HF model, and check it against PyTorch.

The graph is written from the model's config and weights rather than traced: the structure is known, so
attention, RMSNorm and rotary are emitted as model-local ONNX functions (domain `optpipe`) in plain ONNX ops.
That keeps the unfused graph runnable anywhere, and gives `fuse` exact, named units to replace with ONNX
Runtime's fused kernels. The layer's module names and features come from its architecture description
(`optpipe.arch`): llama (SmolLM2, Llama 2/3), mistral, qwen2 (q/k/v biases), qwen3 (q/k norms).

The output check runs the graph in ONNX Runtime on a prompt and one cached decode step and compares logits
with PyTorch; a mismatch beyond `atol` fails the build.
"""
from __future__ import annotations

import re
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import helper
from pydantic import Field

from .. import arch as _arch_desc
from .. import lazy as _lazy
from .. import progress
from ..errors import BuildError
from ..models import rotary_module
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, check_cache_length
from ._onnx import FLOAT, FN_DOMAIN, INT64, OPSET, GraphBuilder, set_metadata

NEG = float(np.finfo(np.float32).min)


PROTO_LIMIT = (1 << 31) - 1  # protobuf's limit on one serialized message


class ExportConfig(PassConfig):
    method: Literal["auto", "family", "generic"] = Field(
        "auto", description="family: written from the architecture description (fast, fusable); generic: traced "
        "by torch.onnx (any decoder, unfused); auto: family when the model's family is described")
    opset: int = Field(OPSET, ge=21, le=23)
    max_positions: int = Field(8192, ge=64, description="rotary cache length: the longest sequence the artifact serves")
    atol: float = Field(1e-2, gt=0, description="largest allowed |logit difference| vs PyTorch")
    check: Literal["logits", "off"] = "logits"


def _arch(config) -> dict:
    try:
        desc = _arch_desc.describe(config)
    except _arch_desc.UnsupportedArchitecture as e:
        raise BuildError(f"export: {e}") from None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"model_type": config.model_type, "desc": desc, "hidden": config.hidden_size, "heads": heads,
            "kv_heads": config.num_key_value_heads, "head_dim": head_dim, "layers": config.num_hidden_layers,
            "vocab": config.vocab_size, "eps": float(config.rms_norm_eps), "intermediate": config.intermediate_size}


def _rmsnorm_function(eps: float) -> onnx.FunctionProto:
    g = GraphBuilder("rms/")
    sq = g.op("Mul", ["x", "x"])
    ms = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
    r = g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])
    g.op("Mul", [g.op("Div", ["x", r]), "weight"], outputs=["y"])
    return helper.make_function(FN_DOMAIN, "RMSNorm", ["x", "weight"], ["y"], g.nodes,
                                [helper.make_opsetid("", OPSET)])


def attention_op(window: int | None) -> str:
    """The attention function's name: one per sliding-window size (fuse reads the window back from it)."""
    return "CausalAttention" if window is None else f"CausalAttentionWindow{window}"


def _attention_function(a: dict, window: int | None = None) -> onnx.FunctionProto:
    """Causal GQA attention with rotary embedding and a growing KV cache, in plain ONNX ops. With a `window`, a
    query at position i sees keys j with i - j < window (transformers' sliding-window mask); with a["softcap"],
    scores are soft-capped as Gemma 2 does.

    Inputs q/k/v are [B, S, heads*D]; past_* are [B, kv_heads, P, D]; positions run from P = T - S to T - 1,
    T being the attention mask's length (so a static cache can later reuse the same convention).
    """
    H, KV, D = a["heads"], a["kv_heads"], a["head_dim"]
    g = GraphBuilder("attn/")
    i64 = lambda v: g.const(v)  # noqa: E731
    S = g.op("Gather", [g.op("Shape", ["q"]), i64(1)], axis=0)
    T = g.op("Gather", [g.op("Shape", ["attention_mask"]), i64(1)], axis=0)
    P = g.op("Sub", [T, S])
    pos = g.op("Range", [P, T, i64(1)])

    def heads(x, n):
        return g.op("Transpose", [g.op("Reshape", [x, i64([0, 0, n, D])])], perm=[0, 2, 1, 3])

    cos = g.op("Gather", ["cos_cache", pos], axis=0)
    sin = g.op("Gather", ["sin_cache", pos], axis=0)
    cos = g.op("Concat", [cos, cos], axis=-1)
    sin = g.op("Concat", [sin, sin], axis=-1)
    half = D // 2

    def rope(x):
        x1 = g.op("Slice", [x, i64([0]), i64([half]), i64([3])])
        x2 = g.op("Slice", [x, i64([half]), i64([D]), i64([3])])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    q = rope(heads("q", H))
    k = rope(heads("k", KV))
    v = heads("v", KV)
    g.op("Concat", ["past_key", k], axis=2, outputs=["present_key"])
    g.op("Concat", ["past_value", v], axis=2, outputs=["present_value"])
    kk, vv = "present_key", "present_value"
    if H != KV:
        expand = i64([1, 1, H // KV, 1, 1])
        kk = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [kk, i64([2])]), expand]), i64([0, H, -1, D])])
        vv = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [vv, i64([2])]), expand]), i64([0, H, -1, D])])
    scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [kk], perm=[0, 1, 3, 2])]),
                          g.const(a["scale"], np.float32)])
    if a["softcap"]:  # Gemma 2: cap * tanh(scores / cap), before the mask
        cap = g.const(a["softcap"], np.float32)
        scores = g.op("Mul", [g.op("Tanh", [g.op("Div", [scores, cap])]), cap])
    rows = g.op("Unsqueeze", [pos, i64([1])])
    cols = g.op("Range", [i64(0), T, i64(1)])
    future = g.op("Greater", [cols, rows])  # [S, T]
    if window is not None:
        too_old = g.op("GreaterOrEqual", [g.op("Sub", [rows, cols]), i64(window)])
        future = g.op("Or", [future, too_old])
    padded = g.op("Unsqueeze", [g.op("Equal", ["attention_mask", i64(0)]), i64([1, 2])])  # [B,1,1,T]
    masked = g.op("Where", [g.op("Or", [future, padded]), g.const(NEG, np.float32), scores])
    ctx = g.op("MatMul", [g.op("Softmax", [masked], axis=-1), vv])
    g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), i64([0, 0, H * D])], outputs=["output"])
    return helper.make_function(
        FN_DOMAIN, attention_op(window),
        ["q", "k", "v", "past_key", "past_value", "attention_mask", "cos_cache", "sin_cache"],
        ["output", "present_key", "present_value"], g.nodes, [helper.make_opsetid("", OPSET)])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def rotary_cache(rot, n: int, layer_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [n, D/2] from a rotary module (of one layer type where the module keeps one table per type)."""
    prefix = f"{layer_type}_" if layer_type is not None else ""
    inv = getattr(rot, prefix + "inv_freq").detach().to(torch.float64)
    freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    scale = float(getattr(rot, prefix + "attention_scaling", 1.0))
    return (freqs.cos() * scale).float().numpy(), (freqs.sin() * scale).float().numpy()


def rotary_tables(rot, config, n: int) -> tuple[dict, list[str]]:
    """{table name: (cos, sin)} and, per decoder layer, the table it uses: one table, or one per layer type when
    the rotary module keeps a base per type (Gemma 3). The full-attention table is `cos_cache`/`sin_cache`."""
    layers = int(config.num_hidden_layers)
    if hasattr(rot, "inv_freq"):
        return {"": rotary_cache(rot, n)}, [""] * layers
    types = list(config.layer_types)
    names = {t: "" if t == "full_attention" else "." + t for t in sorted(set(types))}
    return {names[t]: rotary_cache(rot, n, t) for t in names}, [names[t] for t in types]


class _Weights:
    """Where export takes weights from: an HF model in memory (arrays now), or a checkpoint read tensor by
    tensor (lazy initializers, read and converted only when the artifact is written: the streaming build)."""

    def __init__(self, source):
        from ..checkpoint import LazyCheckpoint

        self.lazy = isinstance(source, LazyCheckpoint)
        self.config = source.config
        self.source = source
        self.sd = None if self.lazy else source.state_dict()

    def has(self, name: str) -> bool:
        return name in self.source if self.lazy else name in self.sd

    def init(self, g: GraphBuilder, onnx_name: str, name: str, transpose: bool = False, offset: float = 0.0) -> str:
        """`offset` is added to the weight (a `1 + w` norm becomes a plain scale)."""
        if not self.lazy:
            arr = _np(self.sd[name]) + np.float32(offset)
            return g.init(onnx_name, arr.T if transpose else arr)
        ck = self.source
        shape = ck.shapes[name][::-1] if transpose else ck.shapes[name]
        if transpose:
            def load():
                return np.ascontiguousarray(ck.get(name).T)
        else:
            def load():
                return ck.get(name) + np.float32(offset) if offset else ck.get(name)
        g.initializers.append(_lazy.tensor(onnx_name, shape, np.float32, load))
        return onnx_name

    def rotary(self):
        return rotary_module(self.config) if self.lazy else self.source.model.rotary_emb


def build_decoder_graph(source, cfg: ExportConfig) -> onnx.ModelProto:
    """`source`: a transformers model, or a LazyCheckpoint (streaming: no weight is read here)."""
    wts = _Weights(source)
    a = _arch(wts.config)
    d: _arch_desc.ArchDescription = a["desc"]
    if (why := d.unsupported(wts.config, cfg.max_positions)) is not None:
        raise BuildError(f"export: {why}")
    H, KV, D, L = a["heads"], a["kv_heads"], a["head_dim"], a["layers"]
    a["scale"] = _arch_desc.attention_scale(wts.config, D)
    a["softcap"] = _arch_desc.setting(wts.config, "attn_logit_softcapping")
    final_softcap = _arch_desc.setting(wts.config, "final_logit_softcapping")
    windows = d.windows(wts.config)
    g = GraphBuilder()
    embed = wts.init(g, d.embed + ".weight", d.embed + ".weight")
    tables, layer_table = rotary_tables(wts.rotary(), wts.config, cfg.max_positions)
    for suffix, (cos, sin) in tables.items():
        g.init("cos_cache" + suffix, cos)
        g.init("sin_cache" + suffix, sin)

    def linear(x, module: str):
        w = wts.init(g, module + ".weight_t", module + ".weight", transpose=True)
        y = g.op("MatMul", [x, w], name=module)
        if wts.has(module + ".bias"):
            y = g.op("Add", [y, wts.init(g, module + ".bias", module + ".bias")], name=module + ".bias_add")
        return y

    def norm(x, module: str):
        weight = wts.init(g, module + ".weight", module + ".weight", offset=d.norm_offset)
        return g.op("RMSNorm", [x, weight], domain=FN_DOMAIN, name=module)

    def per_head_norm(x, module: str, n: int):
        """RMSNorm over each head's D channels (Qwen3's and Gemma 3's q/k norms), before rotary."""
        x4 = g.op("Reshape", [x, g.const([0, 0, n, D])], name=module + ".to_heads")
        return g.op("Reshape", [norm(x4, module), g.const([0, 0, n * D])], name=module + ".from_heads")

    def gated(gate, up, mlp: str):
        if _arch_desc.activation(wts.config) == "gelu_tanh":
            act = g.op("Gelu", [gate], name=f"{mlp}.act_gelu", approximate="tanh")
        else:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{mlp}.act_sigmoid")], name=f"{mlp}.act_silu")
        return g.op("Mul", [act, up], name=f"{mlp}.act_mul")

    h = g.op("Gather", [embed, "input_ids"], name=d.embed)
    if d.embed_scale:  # computed in fp32, as transformers does for fp32 weights
        h = g.op("Mul", [h, g.const(np.float32(a["hidden"]) ** np.float32(0.5), np.float32)], name=d.embed + ".scale")
    inputs = [helper.make_tensor_value_info("input_ids", INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", INT64, ["batch", "total_sequence"])]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch", "sequence", a["vocab"]])]
    for i in range(L):
        p = d.layer_prefix(i)
        x = norm(h, p + d.attn_norm)
        if d.packed:  # one linear in the checkpoint: split its output (fuse hands it to attention packed)
            q, k, v = g.op("Split", [linear(x, p + d.qkv_fused), g.const([H * D, KV * D, KV * D])], n_out=3, axis=-1,
                           name=p + d.qkv_fused + ".split")
        else:
            q, k, v = (linear(x, p + n) for n in (d.q, d.k, d.v))
        if d.qk_norm:
            q, k = per_head_norm(q, p + d.qk_norm[0], H), per_head_norm(k, p + d.qk_norm[1], KV)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        pres_k, pres_v = f"present.{i}.key", f"present.{i}.value"
        attn_name = p + d.o.rsplit(".", 1)[0] + ".attention"
        table = layer_table[i]
        attn, _, _ = g.op(attention_op(windows[i]), [q, k, v, past_k, past_v, "attention_mask", "cos_cache" + table,
                                                     "sin_cache" + table],
                          n_out=3, domain=FN_DOMAIN, name=attn_name, outputs=[attn_name + "/out", pres_k, pres_v])
        out = linear(attn, p + d.o)
        if d.attn_out_norm:
            out = norm(out, p + d.attn_out_norm)
        h = g.op("Add", [h, out], name=p + "attn_residual")
        x = norm(h, p + d.mlp_norm)
        if d.packed:
            gate, up = g.op("Split", [linear(x, p + d.gate_up_fused), g.const([a["intermediate"]] * 2)], n_out=2,
                            axis=-1, name=p + d.gate_up_fused + ".split")
        else:
            gate, up = linear(x, p + d.gate), linear(x, p + d.up)
        out = linear(gated(gate, up, p + d.down.rsplit(".", 1)[0]), p + d.down)
        if d.mlp_out_norm:
            out = norm(out, p + d.mlp_out_norm)
        h = g.op("Add", [h, out], name=p + "mlp_residual")
        for nm in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(nm, FLOAT, ["batch", KV, "past_sequence", D]))
        for nm in (pres_k, pres_v):
            outputs.append(helper.make_tensor_value_info(nm, FLOAT, ["batch", KV, "total_sequence", D]))
    x = norm(h, d.final_norm)
    lm = d.lm_head + ".weight" if wts.has(d.lm_head + ".weight") else d.embed + ".weight"
    w = wts.init(g, d.lm_head + ".weight_t", lm, transpose=True)  # materialized even when tied, so it can be quantized
    if final_softcap:  # Gemma 2: cap * tanh(logits / cap)
        cap = g.const(float(final_softcap), np.float32)
        head = g.op("MatMul", [x, w], name=d.lm_head)
        g.op("Mul", [g.op("Tanh", [g.op("Div", [head, cap])], name="logits_softcap"), cap], outputs=["logits"],
             name="logits_softcap_scale")
    else:
        g.op("MatMul", [x, w], name=d.lm_head, outputs=["logits"])

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
    model_proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", cfg.opset), helper.make_opsetid(FN_DOMAIN, 1)],
        functions=[_rmsnorm_function(a["eps"])] + [_attention_function(a, w) for w in sorted(set(windows), key=str)],
        producer_name="optpipe")
    model_proto.ir_version = 10
    meta = {"optpipe.num_layers": L, "optpipe.num_heads": H, "optpipe.kv_num_heads": KV, "optpipe.head_dim": D,
            "optpipe.vocab_size": a["vocab"], "optpipe.kv_cache": "dynamic", "optpipe.max_length": cfg.max_positions,
            "optpipe.model_type": a["model_type"], "optpipe.family": d.family, "optpipe.rms_norm_eps": repr(a["eps"]),
            "optpipe.attention_scale": repr(a["scale"]), "optpipe.attention_softcap": repr(float(a["softcap"] or 0)),
            "optpipe.export_route": "family", "optpipe.tied_embeddings": int(lm == d.embed + ".weight"
                                                                   or bool(getattr(wts.config, "tie_word_embeddings", False)))}
    for k_, v_ in meta.items():
        model_proto.metadata_props.append(onnx.StringStringEntryProto(key=k_, value=str(v_)))
    return model_proto


def check_against_torch(model, onnx_model: onnx.ModelProto, atol: float, threads: int = 1) -> dict:
    """Prefill 12 tokens then decode 1 with the cache, in both; compare logits. Raises BuildError on mismatch."""
    from ..runtime.ort_decoder import OnnxDecoder

    dec = OnnxDecoder.from_proto(onnx_model, threads=threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(1, 13))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits[0].float().numpy()
    got_prefill, state = dec.prefill(ids[:, :12])
    got_step, _ = dec.step(ids[:, 12:], state)
    got = np.concatenate([got_prefill, got_step], axis=0)
    diff = float(np.abs(got - ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    if not np.isfinite(diff) or diff > atol:
        raise BuildError(f"exported graph disagrees with PyTorch: max |Δlogit| = {diff:.3g} > atol {atol} "
                         f"(top-1 agreement {top1:.2f}); the graph is wrong, not saved")
    return {"max_abs_logit_diff": diff, "top1_agreement": top1}


def build_generic_graph(model, cfg: ExportConfig) -> onnx.ModelProto:
    """The generic route (see `_generic_export`): any transformers decoder in memory."""
    from . import _generic_export

    try:
        shape = _generic_export.cache_shape(model)
    except ValueError as e:
        raise BuildError(f"export (method generic): {model.config.model_type}: {e}") from None
    except Exception as e:  # the model's own forward failed: not something a trace would fix
        raise BuildError(f"export (method generic): a one-token forward of {model.config.model_type} with a cache "
                         f"failed: {type(e).__name__}: {e}") from e
    progress.note(f"tracing {model.config.model_type} with torch.onnx.export (the generic route; minutes for a "
                  "large model)")
    try:
        proto = _generic_export.trace(model, cfg.opset, shape)
    except Exception as e:  # the exporter's errors are many kinds, wrapped: the build names the innermost one
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip().split("\n")[0]  # no terminal colours in logs
        raise BuildError(f"export (method generic): torch.onnx could not trace {model.config.model_type}: "
                         f"{type(root).__name__}: {first or '(no message)'}") from e
    set_metadata(proto, **_generic_export.metadata(model.config, shape, cfg.max_positions))
    proto.producer_name = "optpipe"
    return proto


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # config names of the count


def route(method: str, model_type: str | None) -> str:
    """The export route a recipe's `method` takes for a model: "family" or "generic"."""
    if method != "auto":
        return method
    return "family" if model_type in _arch_desc.supported() else "generic"


class Export(Pass):
    name = "export"
    streams = True
    Config = ExportConfig
    input_stage = "torch"
    output_stage = "onnx"
    provides = frozenset({"onnx"})
    targets = frozenset({"cpu-onnx", "gpu-tensorrt"})
    once = True

    @property
    def topology(self) -> bool:  # type: ignore[override]
        """Only the family route reads the layer topology (auto falls back to generic without one)."""
        return self.config.method == "family"

    def route_for(self, facts) -> str:
        """Which route this export takes for the model `validate` read."""
        return route(self.config.method, facts.model_type)

    def check_recipe(self, recipe, facts, earlier) -> None:
        if facts is None:
            return
        check_cache_length(self.config.max_positions, recipe, None, "", "max_positions")  # the model's own: preflight
        if route(self.config.method, facts.model_type) == "generic":
            if recipe.model.streaming:
                raise ValueError(f"method generic traces the model in memory; model.streaming needs the family route "
                                 f"(model_type {facts.model_type!r}; described: {', '.join(_arch_desc.supported())})")
            if recipe.target == "gpu-tensorrt":  # tried on GPT-2 and OPT: the profile and polygraphy's lint refuse it
                raise ValueError(f"gpu-tensorrt needs the family route: a generic trace fixes batch 1, has no "
                                 f"attention or norm units `fp16` can keep in float32, and fails TensorRT's lint "
                                 f"(model_type {facts.model_type!r}; described: {', '.join(_arch_desc.supported())})")
            experts = next((n for k in MOE_KEYS if isinstance(n := facts.config.get(k), int) and n > 1), None)
            if experts:  # tried on Mixtral, Qwen2-MoE, OLMoE: refused here, not after the model has loaded
                raise ValueError(f"a mixture of experts ({experts} experts): torch.onnx has no ONNX function for "
                                 f"transformers' expert kernels, so the generic route cannot trace it (the cpu-torch "
                                 f"target runs it, its experts in float)")
            lm = [a for a in facts.architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
            if facts.architectures and not lm:
                raise ValueError(f"the generic route traces a causal language model; the model's config names "
                                 f"{', '.join(facts.architectures)} (described families: "
                                 f"{', '.join(_arch_desc.supported())})")
            return
        why = _arch_desc.describe(facts.model_type).unsupported(facts.config, self.config.max_positions)
        if why is not None:
            raise ValueError(why)

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        streaming = state.torch_model is None and state.checkpoint is not None
        if not streaming:
            self._fits_in_a_proto(state.torch_model)
        source = state.checkpoint if streaming else state.torch_model
        how = route(self.config.method, source.config.model_type)
        if how == "generic":
            if streaming:
                raise BuildError("export: method generic needs the model in memory (model.streaming is set)")
            state.onnx_model = build_generic_graph(source, self.config)
        else:
            state.onnx_model = build_decoder_graph(source, self.config)
        changes = {"route": how, "nodes": len(state.onnx_model.graph.node),
                   "initializers": len(state.onnx_model.graph.initializer),
                   "layers": int(source.config.num_hidden_layers), "streaming": streaming}
        notes = []
        if how == "generic":
            notes.append(f"generic route: {source.config.model_type} traced by torch.onnx (dynamo); unfused graph")
        if streaming:
            notes.append("streaming: weights stay in the checkpoint until the artifact is written; the PyTorch "
                         "output check is replaced by the accuracy gate against the layer-by-layer reference")
        elif self.config.check == "logits":
            changes.update(check_against_torch(state.torch_model, state.onnx_model, self.config.atol, ctx.threads))
        else:
            notes.append("output check against PyTorch disabled by the recipe (check: off)")
        return PassResult(True, changes, notes)

    @staticmethod
    def _fits_in_a_proto(model) -> None:
        """An in-memory graph is one protobuf message (2 GiB at most): say so before exporting, not as a
        serialization error after it."""
        size = sum(p.numel() * 4 for p in model.parameters())  # the graph's weights are fp32
        if size > PROTO_LIMIT:
            raise BuildError(f"export: the model's weights are {size / 1e9:.1f} GB in fp32, over the 2 GiB an ONNX "
                             "graph held in memory can have: set `model: {source: ..., streaming: true}` (the "
                             "streaming build writes the weights beside the graph; docs/recipes.md)")
