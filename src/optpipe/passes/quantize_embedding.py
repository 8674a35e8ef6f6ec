"""`quantize-embedding`: the input embedding as block-quantized INT4/INT8 (ONNX Runtime's GatherBlockQuantized).

Weight-only quantizers leave the token embedding in fp32: for SmolLM2 that is 113 MB, half the INT4 artifact. With a
tied head already in MatMulNBits (a quantizer ran on `lm_head` before this pass), the lookup reads the head's own
packed blocks, so the file stores them once; the embedding then equals the head's quantized weight as the kernel
reads it, whatever scheme fitted it (float zero points: their remainder's digit blocks are gathered too). Otherwise the embedding is quantized by RTN
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
from ..pipeline import ModelState, OrtQuantizePass, PassConfig, PassContext, PassResult
from ._nbits import decoded_params, kernel_k, packed, stored_names, stored_parts
from ._onnx import FLOAT, MS_DOMAIN, GraphBuilder, GraphEdit, ensure_opset, metadata, tensor_ranks


class EmbeddingConfig(PassConfig):
    bits: Literal[4, 8] = 8
    block_size: Literal[16, 32, 64, 128] = 32
    zero_point: Literal["symmetric", "int", "float"] = "symmetric"
    clip_search: bool = Field(False, description="int/float zero points: MSE-searched block ranges")
    share_head: bool = Field(True, description="a tied embedding reads the quantized lm_head's blocks (stored once); "
                                               "bits/block_size/zero_point/scale_dtype then come from the head's "
                                               "quantizer")
    scale_dtype: _quant.ScaleDtype


def _embedding_gather(model: onnx.ModelProto, inits) -> onnx.NodeProto:
    """The token embedding's lookup: a Gather of a float 2-D weight by input_ids, or by a reshape of it whose output
    is [batch, sequence, hidden] as the lookup writes it (GPT-2's and OPT's traces gather by input_ids.view(-1, n))."""
    ids, ranks = {"input_ids"}, tensor_ranks(model)
    for n in model.graph.node:
        if n.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity") and n.input[0] in ids:
            ids.add(n.output[0])
    found = [n for n in model.graph.node if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in ids
             and (n.input[1] == "input_ids" or ranks.get(n.output[0]) == 3)
             and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == FLOAT]
    if len(found) != 1:
        raise BuildError(f"quantize-embedding: expected one Gather of a float 2-D weight by input_ids, found "
                         f"{len(found)}{' (already quantized?)' if not found else ''}")
    return found[0]


def _tied_head(model: onnx.ModelProto, vocab: int, hidden: int) -> onnx.NodeProto | None:
    """The MatMulNBits computing logits from the tied embedding, when export recorded the tie."""
    if metadata(model).get("optpipe.tied_embeddings") != "1":
        return None
    def reads(n):  # a float-zero-point weight's kernel also reads its remainder's digit blocks
        a = _attrs(n)
        return a["N"] == vocab and a["K"] in {kernel_k(hidden, a["block_size"], s) for s in ("int", "float")}

    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN and reads(n)]
    if len(heads) > 1:  # another linear of the same shape (an MLP as wide as the vocabulary): both routes name it
        heads = [n for n in heads if n.name == "lm_head"]
    return heads[0] if len(heads) == 1 else None


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute}


class QuantizeEmbedding(OrtQuantizePass):
    name = "quantize-embedding"
    Config = EmbeddingConfig

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
            p = stored_names(head.name, edit)
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
            decode, p = decoded_params(base, bits, c.zero_point, dtype)
            edit.new_nodes += decode
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
        """GatherBlockQuantized over MatMulNBits-layout blocks: the scales viewed as [V, blocks, 1], zero points
        unpacked to [V, blocks, 1]. A float-zero-point weight (`quant.integer_form`) has its remainder's digit
        blocks after the weight's: summed over digits, position b of them is block b's remainder, added back."""
        nb = hidden // block
        blocks_stored = edit.tensor(p["qweight"]).dims[1]
        extra = blocks_stored - nb
        g = GraphBuilder()
        shape = lambda name, dims: g.init(f"{base}.{name}", np.array(dims, np.int64))  # noqa: E731
        scales = g.op("Reshape", [p["scales"], shape("scales_view", [vocab, blocks_stored, 1])], name=base + "/scales")
        inputs = [p["qweight"], gather.input[1], scales]
        if p["zero_points"]:
            edit.new_inits.append(edit.derived(base + ".block_zero_points", (vocab, blocks_stored, 1), np.uint8,
                                               lambda z: _quant.unpack_bits(z.reshape(vocab, -1), bits, blocks_stored),
                                               [p["zero_points"]]))
            inputs.append(base + ".block_zero_points")
        blocks = g.op("GatherBlockQuantized", inputs, name=base, domain=MS_DOMAIN, bits=bits, block_size=block,
                      gather_axis=0, quantize_axis=2, outputs=[base + "/blocks"])
        if extra:
            digits, block_axis = _quant.REMAINDER_DIGITS, shape("block_axis", [-2])

            def part(name, start, end):
                return g.op("Slice", [blocks, shape(name + "_start", [start]), shape(name + "_end", [end]), block_axis],
                            name=f"{base}/{name}")
            weight, rest = part("weight", 0, nb), part("remainder_digits", nb, blocks_stored)
            rest = g.op("Reshape", [rest, shape("digit_rows", [0, 0, digits, extra // digits * block])],
                        name=base + "/digit_rows")
            rest = g.op("ReduceSum", [rest, shape("digit_axis", [2])], name=base + "/remainder_sum", keepdims=0)
            rest = g.op("Slice", [rest, shape("remainder_start", [0]), shape("remainder_end", [nb]),
                                  shape("last_axis", [-1])], name=base + "/remainder")
            rest = g.op("Unsqueeze", [rest, f"{base}.last_axis"], name=base + "/remainder_b")
            blocks = g.op("Add", [weight, rest], name=base + "/dequant")
        g.op("Reshape", [blocks, shape("hidden_shape", [0, 0, hidden])], name=base + "/hidden",
             outputs=[gather.output[0]])
        edit.new_inits += g.initializers
        return g.nodes

    def _rtn(self, w: np.ndarray) -> _quant.QuantizedWeight:
        c = self.config
        return _quant.rtn(w, c.bits, c.block_size, c.zero_point, c.clip_search, c.scale_dtype)
