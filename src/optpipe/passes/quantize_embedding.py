"""`quantize-embedding`: the input embedding as block-quantized INT4/INT8 (ONNX Runtime's GatherBlockQuantized).

Weight-only quantizers leave the token embedding in fp32: for SmolLM2 that is 113 MB, half the INT4 artifact. With a
tied head already in MatMulNBits (a quantizer ran on `lm_head` before this pass), the lookup reads the head's own
packed blocks, so the file stores them once; the embedding then equals the head's quantized weight exactly, whatever
scheme fitted it (float zero points via a gathered per-block remainder). Otherwise the embedding is quantized by RTN
and stored as MatMulNBits stores a weight (passes._nbits), so both cases share one lookup.
Run it after the weight quantizers: a sequential GPTQ walk reads the float embedding.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper
from pydantic import Field

from .. import lazy as _lazy
from .. import quant as _quant
from ..errors import BuildError
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, ScaleDtype, register
from ._nbits import decoded_params, packed, residual_name, stored_parts
from ._onnx import FLOAT, MS_DOMAIN, GraphBuilder, GraphEdit, ensure_opset, metadata


class EmbeddingConfig(PassConfig):
    bits: Literal[4, 8] = 8
    block_size: Literal[16, 32, 64, 128] = 32
    zero_point: Literal["symmetric", "int", "float"] = "symmetric"
    clip_search: bool = Field(False, description="int/float zero points: MSE-searched block ranges")
    share_head: bool = Field(True, description="a tied embedding reads the quantized lm_head's blocks (stored once); "
                                               "bits/block_size/zero_point/scale_dtype then come from the head's "
                                               "quantizer")
    scale_dtype: ScaleDtype = "float16"


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
        error = None
        if head is not None:  # the head's stored blocks and the float32 parameters decoded from them
            a = _attrs(head)
            bits, block = a["bits"], a["block_size"]
            p = {"qweight": head.input[1], "scales": head.input[2],
                 "zero_points": head.input[3] if len(head.input) > 3 and head.input[3] else None,
                 "residual": residual_name(head.name) if residual_name(head.name) in edit.prod else None}
            how = f"shared with {head.name} ({state.handoff.quantized.get(head.name, f'int{bits} block{block}')})"
        else:
            bits, block = c.bits, c.block_size
            if hidden % block:
                raise BuildError(f"quantize-embedding block_size: hidden size {hidden} is not a multiple of {block}")
            dtype = c.scale_dtype
            parts = stored_parts(vocab, hidden // block, block, bits, c.zero_point, dtype)
            if _lazy.is_lazy(src):  # streaming build: quantized when the writer reaches these tensors
                shared = _lazy.Shared(lambda: packed(self._rtn(_lazy.array(src)), bits, dtype), len(parts))
                edit.new_inits += [_lazy.tensor(f"{base}.{suffix}", shape, dt, shared.part(key))
                                   for suffix, key, shape, dt in parts]
            else:
                w = numpy_helper.to_array(src)
                qw = self._rtn(w)
                error = _quant.relative_error(qw.dequantize(), w)
                arrays = packed(qw, bits, dtype)
                edit.new_inits += [numpy_helper.from_array(arrays[key], f"{base}.{suffix}") for suffix, key, _, _ in parts]
            decode, decode_inits, p = decoded_params(base, vocab, hidden // block, bits, c.zero_point, dtype)
            edit.new_nodes += decode
            edit.new_inits += decode_inits
            how = (f"int{bits} rtn{' clipped' if c.clip_search else ''} block{block} {c.zero_point} "
                   f"({c.scale_dtype} scales)")
        edit.new_nodes += self._lookup(edit, gather, base, p, vocab, hidden, bits, block)
        edit.remove.add(id(gather))
        edit.drop_inits.add(gather.input[0])
        edit.commit()
        ensure_opset(model, MS_DOMAIN, 1)
        state.handoff.quantized[base] = how
        changes = {"embedding": base, "scheme": how, "bytes_fp32": 4 * vocab * hidden}
        if error is not None:
            changes["weight_rel_error"] = round(error, 5)
        return PassResult(True, changes, [f"{base}: {how}"])

    @staticmethod
    def _lookup(edit: GraphEdit, gather, base: str, p: dict, vocab: int, hidden: int, bits: int, block: int):
        """GatherBlockQuantized over MatMulNBits-layout blocks: the scales viewed as [V, nb, 1], integer zero points
        unpacked to [V, nb, 1], a float zero point's remainder R [nb, V] gathered as rows of its transpose."""
        nb = hidden // block
        g = GraphBuilder()
        scales = g.op("Reshape", [p["scales"], g.init(base + ".scales_view", np.array([vocab, nb, 1], np.int64))],
                      name=base + "/scales")
        inputs = [p["qweight"], gather.input[1], scales]
        if p["zero_points"]:
            edit.new_inits.append(edit.derived(base + ".block_zero_points", (vocab, nb, 1), np.uint8,
                                               lambda z: _quant.unpack_bits(z.reshape(vocab, -1), bits, nb),
                                               [p["zero_points"]]))
            inputs.append(base + ".block_zero_points")
        blocks = g.op("GatherBlockQuantized", inputs, name=base, domain=MS_DOMAIN, bits=bits, block_size=block,
                      gather_axis=0, quantize_axis=2, outputs=[base + "/blocks"])
        if p["residual"] is not None:  # d*(q - 2^(bits-1)) + r per block
            rows = g.op("Transpose", [p["residual"]], name=base + "/residual_rows", perm=[1, 0])
            picked = g.op("Gather", [rows, gather.input[1]], name=base + "/residual_picked", axis=0)
            per_block = g.op("Unsqueeze", [picked, g.init(base + ".last_axis", np.array([-1], np.int64))],
                             name=base + "/residual_b")
            blocks = g.op("Add", [blocks, per_block], name=base + "/dequant")
        g.op("Reshape", [blocks, g.init(base + ".hidden_shape", np.array([0, 0, hidden], np.int64))],
             name=base + "/hidden", outputs=[gather.output[0]])
        edit.new_inits += g.initializers
        return g.nodes

    def _rtn(self, w: np.ndarray) -> _quant.QuantizedWeight:
        c = self.config
        return _quant.rtn(w, c.bits, c.block_size, c.zero_point, c.clip_search, c.scale_dtype)
