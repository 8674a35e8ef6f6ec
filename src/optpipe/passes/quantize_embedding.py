"""`quantize-embedding`: the input embedding as block-quantized INT4/INT8 (ONNX Runtime's GatherBlockQuantized).

Weight-only quantizers leave the token embedding in fp32: for SmolLM2 that is 113 MB, half the INT4 artifact. With a
tied head already in MatMulNBits (a quantizer ran on `lm_head` before this pass), the lookup reads the head's own
packed blocks, so the file stores them once; the embedding then equals the head's quantized weight exactly, whatever
scheme fitted it (float zero points via a gathered per-block remainder). Otherwise the embedding is quantized by RTN.
Run it after the weight quantizers: a sequential GPTQ walk reads the float embedding.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from .. import lazy as _lazy
from .. import quant as _quant
from ..errors import BuildError
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, register
from ._onnx import FLOAT, MS_DOMAIN, GraphEdit, ensure_opset, metadata

NBITS_INPUTS = ("qweight", "scales", "zero_points")


class EmbeddingConfig(PassConfig):
    bits: Literal[4, 8] = 8
    block_size: Literal[16, 32, 64, 128] = 32
    zero_point: Literal["symmetric", "int", "float"] = "symmetric"
    clip_search: bool = Field(False, description="int/float zero points: MSE-searched block ranges")
    share_head: bool = Field(True, description="a tied embedding reads the quantized lm_head's blocks (stored once); "
                                               "bits/block_size/zero_point then come from the head's quantizer")


def _embedding_gather(model: onnx.ModelProto, inits) -> onnx.NodeProto:
    found = [n for n in model.graph.node if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "input_ids"
             and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == FLOAT]
    if len(found) != 1:
        raise BuildError(f"quantize-embedding: expected one Gather of a float 2-D weight by input_ids, found "
                         f"{len(found)}{' (already quantized?)' if not found else ''}")
    return found[0]


def _tied_head(model: onnx.ModelProto, vocab: int, hidden: int) -> onnx.NodeProto | None:
    """The MatMulNBits computing logits from the tied embedding, when export recorded the tie."""
    if metadata(model).get("optpipe.tied_embeddings") != "1":
        return None
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN
             and (_attrs(n)["N"], _attrs(n)["K"]) == (vocab, hidden)]
    return heads[0] if len(heads) == 1 else None


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute}


@register
class QuantizeEmbedding(Pass):
    name = "quantize-embedding"
    streams = True
    Config = EmbeddingConfig
    requires = frozenset({"onnx"})
    provides = frozenset({"quantized"})
    targets = frozenset({"cpu-onnx"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        model = state.onnx_model
        edit = GraphEdit(model)
        inits = edit.inits
        gather = _embedding_gather(model, inits)
        src = inits[gather.input[0]]
        vocab, hidden = src.dims
        base = gather.name or gather.input[0]
        head = _tied_head(model, vocab, hidden) if c.share_head else None
        if head is not None:
            a = _attrs(head)
            bits, block = a["bits"], a["block_size"]
            nb = hidden // block
            data = head.input[1]  # [V, nb, block*bits/8]: the same bytes serve both
            views = [(base + ".scales", (vocab, nb, 1), np.float32, lambda s: s, head.input[2]),
                     (base + ".zero_points", (vocab, nb, 1), np.uint8,
                      lambda z: _quant.unpack_bits(z.reshape(vocab, -1), bits, nb), head.input[3])]
            if head.name + ".zp_residual" in inits:  # float zero points: the remainder, [nb, V] for MatMulNBits
                views.append((base + ".zp_residual", (vocab, nb), np.float32, lambda r: r.T, head.name + ".zp_residual"))
            edit.new_inits += [edit.derived(name, shape, dtype, fn, [src_name])
                               for name, shape, dtype, fn, src_name in views]
            scales, zeros = views[0][0], views[1][0]
            residual = views[2][0] if len(views) > 2 else None
            how = f"shared with {head.name} ({state.handoff.quantized.get(head.name, f'int{bits} block{block}')})"
            error = None
        else:
            bits, block = c.bits, c.block_size
            if hidden % block:
                raise BuildError(f"quantize-embedding block_size: hidden size {hidden} is not a multiple of {block}")
            nb = hidden // block
            shapes = {"data": ((vocab, nb, block * bits // 8), np.uint8), "scales": ((vocab, nb, 1), np.float32),
                      "zero_points": ((vocab, nb, 1), np.uint8)}
            if c.zero_point == "float":
                shapes["residual"] = ((vocab, nb), np.float32)
            names = {key: base + "." + ("zp_residual" if key == "residual" else key) for key in shapes}
            if _lazy.is_lazy(src):  # streaming build: quantized when the writer reaches these tensors
                error = None
                shared = _lazy.Shared(lambda: self._quantize(_lazy.array(src)), len(shapes))
                edit.new_inits += [_lazy.tensor(names[k], *shapes[k], shared.part(k)) for k in shapes]
            else:
                parts = self._quantize(numpy_helper.to_array(src))
                error = parts.pop("error")
                edit.new_inits += [numpy_helper.from_array(parts[k], names[k]) for k in shapes]
            data, scales, zeros, residual = names["data"], names["scales"], names["zero_points"], names.get("residual")
            how = f"int{bits} rtn{' clipped' if c.clip_search else ''} block{block} {c.zero_point}"
        out = gather.output[0]
        blocks = base + "/blocks"
        nodes = [helper.make_node("GatherBlockQuantized", [data, gather.input[1], scales, zeros], [blocks],
                                  name=base, domain=MS_DOMAIN, bits=bits, block_size=block, gather_axis=0,
                                  quantize_axis=2)]
        if residual is not None:  # d*(q - z) + r per block
            edit.new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), base + ".last_axis"))
            nodes += [helper.make_node("Gather", [residual, gather.input[1]], [base + "/residual"], name=base + "/residual",
                                       axis=0),
                      helper.make_node("Unsqueeze", [base + "/residual", base + ".last_axis"],
                                       [base + "/residual_b"], name=base + "/residual_b"),
                      helper.make_node("Add", [blocks, base + "/residual_b"], [base + "/dequant"],
                                       name=base + "/dequant")]
            blocks = base + "/dequant"
        edit.new_inits.append(numpy_helper.from_array(np.array([0, 0, hidden], np.int64), base + ".hidden_shape"))
        nodes.append(helper.make_node("Reshape", [blocks, base + ".hidden_shape"], [out], name=base + "/hidden"))
        edit.new_nodes += nodes
        edit.remove.add(id(gather))
        edit.drop_inits.add(gather.input[0])
        edit.commit()
        ensure_opset(model, MS_DOMAIN, 1)
        state.handoff.quantized[base] = how
        changes = {"embedding": base, "scheme": how, "bytes_fp32": 4 * vocab * hidden}
        if error is not None:
            changes["weight_rel_error"] = round(error, 5)
        return PassResult(True, changes, [f"{base}: {how}"])

    def _quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        c = self.config
        qw = _quant.rtn(w, c.bits, c.block_size, c.zero_point, c.clip_search)
        v, nb, _ = qw.q.shape
        out = {"data": _quant.pack_bits(qw.q, c.bits), "scales": qw.scale.reshape(v, nb, 1).astype(np.float32),
               "zero_points": qw.zero.reshape(v, nb, 1), "error": _quant.relative_error(qw.dequantize(), w)}
        if qw.residual is not None:
            out["residual"] = qw.residual.astype(np.float32)
        return out
