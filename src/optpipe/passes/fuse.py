"""`fuse`: replace the exported graph's units with ONNX Runtime's fused CPU kernels, and count each fusion.

- attention (`optpipe:CausalAttention[WindowN]`: rotary + KV cache + GQA) -> `com.microsoft:GroupQueryAttention`
  with `do_rotary=1` (and `local_window_size=N` for a sliding window), taking a packed QKV projection when q/k/v share their input;
- q/k/v projections -> one MatMul (`qkv_proj`); MLP gate/up projections -> one MatMul + Split (names from the
  architecture description);
- residual Add + RMSNorm -> `com.microsoft:SkipSimplifiedLayerNormalization`; other RMSNorm ->
  `SimplifiedLayerNormalization`.
SiLU-mul stays two element-wise ops: ONNX Runtime's CPU provider has no fused SwiGLU kernel.
Run it before quantization: it fuses float MatMul weights.
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from .. import arch
from ..errors import BuildError
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult
from ._onnx import FN_DOMAIN, INT32, MS_DOMAIN, GraphEdit, drop_unused_functions, ensure_opset, metadata


class FuseConfig(PassConfig):
    attention: bool = True
    rmsnorm: bool = True
    qkv: bool = True
    gate_up: bool = True


def _window(op_type: str) -> int:
    """GroupQueryAttention's local_window_size for an export attention function (-1: full causal attention)."""
    suffix = op_type.removeprefix("CausalAttention").removeprefix("Window")
    return int(suffix) if suffix else -1


def _weight_matmul(node, inits) -> bool:
    return node is not None and node.op_type == "MatMul" and node.input[1] in inits


class _Graph(GraphEdit):
    """GraphEdit plus the matching helpers fusion needs."""

    def source_of(self, value: str):
        """(matmul, bias_add|None) producing `value` as x @ W (+ b), or None."""
        node = self.prod.get(value)
        if node is not None and node.op_type == "Add" and node.input[1] in self.inits:
            mm = self.prod.get(node.input[0])
            return (mm, node) if _weight_matmul(mm, self.inits) else None
        return (node, None) if _weight_matmul(node, self.inits) else None

    def concat_linears(self, parts, name: str):
        """One MatMul over the concatenated weights (and biases) of `parts`, which share their input."""
        wname = name + ".weight_t"
        self.new_inits.append(self.concat(wname, [mm.input[1] for mm, _ in parts], axis=1))
        out = name + "/out"
        self.new_nodes.append(helper.make_node("MatMul", [parts[0][0].input[0], wname], [out], name=name))
        if all(b is not None for _, b in parts):
            bname = name + ".bias"
            self.new_inits.append(self.concat(bname, [b.input[1] for _, b in parts], axis=0))
            self.new_nodes.append(helper.make_node("Add", [out, bname], [out + "_bias"], name=name + ".bias_add"))
            out = out + "_bias"
        for mm, b in parts:
            self.remove.add(id(mm))
            self.drop_inits.add(mm.input[1])
            if b is not None:
                self.remove.add(id(b))
                self.drop_inits.add(b.input[1])
        return out, [self.inits[mm.input[1]].dims[1] for mm, _ in parts]


class Fuse(Pass):
    targets = frozenset({"cpu-onnx"})  # ORT contrib kernels; TensorRT takes the unfused graph
    name = "fuse"
    topology = True
    streams = True
    Config = FuseConfig
    provides = frozenset({"fused-attention"})
    requires = frozenset({"onnx"})

    def check_recipe(self, recipe, facts, earlier) -> None:
        from .export import route

        export = next((p for p in earlier if p.name == "export"), None)
        if export is not None and facts is not None and route(export.config.method, facts.model_type) == "generic":
            raise ValueError("fuses the units the family export writes; export takes the generic route here "
                             "(a torch.onnx trace), which has none: drop `fuse` (and `static-kv-cache`) or use "
                             "export method family")

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.onnx_model
        meta = metadata(model)
        if meta.get("optpipe.export_route") == "generic":
            raise BuildError("fuse: the graph comes from the generic export route, which has no units to fuse")
        counts = {"attention_gqa": 0, "qkv_packed": 0, "gate_up": 0, "skip_rmsnorm": 0, "rmsnorm": 0}
        g = _Graph(model)
        desc = arch.describe(meta["optpipe.model_type"])
        if self.config.attention:
            self._attention(g, meta, desc, counts)
        if self.config.gate_up:
            self._gate_up(g, desc, counts)
        g.commit()
        if self.config.rmsnorm:
            g = _Graph(model)
            self._rmsnorm(g, float(meta["optpipe.rms_norm_eps"]), counts)
            g.commit()
        drop_unused_functions(model)
        ensure_opset(model, MS_DOMAIN, 1)
        notes = [] if counts["attention_gqa"] else ["no attention unit found to fuse"]
        if not self.config.attention:
            notes.append("attention left unfused (fuse.attention: false): the static KV cache needs it fused")
        return PassResult(any(counts.values()), counts, notes)

    def _attention(self, g: _Graph, meta: dict, desc: arch.ArchDescription, counts: dict) -> None:
        attn = [n for n in g.model.graph.node if n.domain == FN_DOMAIN and n.op_type.startswith("CausalAttention")]
        if not attn:
            return
        # Shared by every layer: GQA's sequence bookkeeping, from the attention mask.
        g.new_nodes += [
            helper.make_node("ReduceSum", ["attention_mask", "gqa/axes1"], ["gqa/mask_sum"], name="gqa/mask_sum", keepdims=0),
            helper.make_node("Sub", ["gqa/mask_sum", "gqa/one"], ["gqa/seqlens_i64"], name="gqa/seqlens_sub"),
            helper.make_node("Cast", ["gqa/seqlens_i64"], ["gqa/seqlens_k"], name="gqa/seqlens_k", to=INT32),
            helper.make_node("Shape", ["attention_mask"], ["gqa/mask_shape"], name="gqa/mask_shape", start=1, end=2),
            helper.make_node("Squeeze", ["gqa/mask_shape"], ["gqa/total_i64"], name="gqa/total_squeeze"),
            helper.make_node("Cast", ["gqa/total_i64"], ["gqa/total_sequence_length"], name="gqa/total", to=INT32),
        ]
        g.new_inits += [numpy_helper.from_array(np.array([1], np.int64), "gqa/axes1"),
                        numpy_helper.from_array(np.array(1, np.int64), "gqa/one")]
        heads, kv_heads, head_dim = (int(meta[k]) for k in ("optpipe.num_heads", "optpipe.kv_num_heads", "optpipe.head_dim"))
        scale = float(meta.get("optpipe.attention_scale", 1.0 / float(np.sqrt(head_dim))))
        softcap = float(meta.get("optpipe.attention_softcap", 0.0))
        for node in attn:
            q, k, v, past_k, past_v, _mask, cos, sin = node.input
            srcs = [g.source_of(x) for x in (q, k, v)]
            packed = (self.config.qkv and all(srcs) and len({s[0].input[0] for s in srcs}) == 1
                      and len({s[1] is None for s in srcs}) == 1)
            split = g.prod.get(q)
            if packed:
                layer = node.name.removesuffix(desc.o.rsplit(".", 1)[0] + ".attention")
                q, _ = g.concat_linears(srcs, layer + desc.qkv_fused)
                k = v = ""
                counts["qkv_packed"] += 1
            elif self.config.qkv and split is not None and split.op_type == "Split" and list(split.output) == [q, k, v]:
                q, k, v = split.input[0], "", ""  # packed in the checkpoint (Phi-3): attention takes it whole
                g.remove.add(id(split))
                counts["qkv_packed"] += 1
            g.new_nodes.append(helper.make_node(
                "GroupQueryAttention", [q, k, v, past_k, past_v, "gqa/seqlens_k", "gqa/total_sequence_length", cos, sin],
                list(node.output), name=node.name, domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
                do_rotary=1, rotary_interleaved=0, scale=scale, softcap=softcap,
                local_window_size=_window(node.op_type)))
            g.remove.add(id(node))
            counts["attention_gqa"] += 1

    def _gate_up(self, g: _Graph, desc: arch.ArchDescription, counts: dict) -> None:
        for gate in [n for n in g.model.graph.node if n.op_type == "MatMul" and n.name.endswith("." + desc.gate)]:
            layer = gate.name.removesuffix(desc.gate)
            up = next((n for n in g.cons.get(gate.input[0], []) if n.op_type == "MatMul" and n.name == layer + desc.up),
                      None)
            if up is None or not (_weight_matmul(gate, g.inits) and _weight_matmul(up, g.inits)):
                continue
            name = layer + desc.gate_up_fused
            out, sizes = g.concat_linears([(gate, None), (up, None)], name)
            g.new_inits.append(numpy_helper.from_array(np.array(sizes, np.int64), name + ".split"))
            g.new_nodes.append(helper.make_node("Split", [out, name + ".split"], [gate.output[0], up.output[0]],
                                                name=name + ".split", axis=-1))
            counts["gate_up"] += 1

    def _rmsnorm(self, g: _Graph, eps: float, counts: dict) -> None:
        for node in [n for n in g.model.graph.node if n.domain == FN_DOMAIN and n.op_type == "RMSNorm"]:
            x, gamma = node.input
            add = g.prod.get(x)
            g.remove.add(id(node))
            if add is not None and add.op_type == "Add" and id(add) not in g.remove and add.input[1] not in g.inits:
                others = [c for c in g.cons.get(x, []) if c is not node]
                sum_out = x if others else ""
                g.new_nodes.append(helper.make_node(
                    "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], gamma],
                    [node.output[0], "", "", sum_out], name=node.name, domain=MS_DOMAIN, epsilon=eps))
                g.remove.add(id(add))
                counts["skip_rmsnorm"] += 1
            else:
                g.new_nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, gamma], [node.output[0]],
                                                    name=node.name, axis=-1, epsilon=eps, stash_type=1))
                counts["rmsnorm"] += 1
