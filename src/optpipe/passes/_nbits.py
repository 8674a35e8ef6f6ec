"""Shared by `quantize-int4` and `quantize-int8` (weight-only): select MatMuls, quantize, rewrite to MatMulNBits."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import lazy as _lazy
from .. import quant as _quant
from ..layerwise import EffectiveWeight
from ..pipeline import ModelState, PassContext
from ..progress import track
from ._onnx import FLOAT, MS_DOMAIN, GraphEdit, ensure_opset, initializer_map, prefill_feeds, tensor_ranks


def select_matmuls(model: onnx.ModelProto, include: list[str], exclude: list[str]):
    """MatMul nodes with a 2-D float initializer as B, filtered by regex on the node name.
    Returns (selected, skipped: {name: reason}). A MatMul of two activations (a traced graph's attention scores) is
    not a layer, so it is neither."""
    inits = initializer_map(model)
    weights, skipped = {}, {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type != FLOAT:
            skipped[node.name] = "B is not a 2-D float weight"
        else:
            weights[node.name] = node
    chosen, unselected = _quant.select(list(weights), include, exclude)
    return [weights[n] for n in chosen], {**skipped, **unselected}


def activation_stats(model: onnx.ModelProto, names: list[str], windows, threads: int, kind: str) -> dict[str, np.ndarray]:
    """Run the graph on calibration windows and reduce each activation `name` ([..., C]):
    kind "hessian": H = 2/n * sum(X^T X) (GPTQ); kind "absmax": max |x| over everything (per-tensor scales)."""
    import onnxruntime as ort

    from ..runtime.ort_decoder import session_options

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in names:
        probe.graph.output.append(onnx.ValueInfoProto(name=n))
    # "basic": a quantized graph's MatMulNBits read scales that only constant folding makes constant
    sess = ort.InferenceSession(probe.SerializeToString(), session_options(threads, optimize="basic"),
                                providers=["CPUExecutionProvider"])
    acc: dict = {n: _quant.HessianSum() if kind == "hessian" else None for n in names}
    for ids in track(windows, desc=f"calibration ({kind})", unit="window"):
        outs = sess.run(names, prefill_feeds(model, ids))
        for n, x in zip(names, outs):
            if kind == "hessian":
                acc[n].add(x)
            else:
                v = np.abs(x).max()
                acc[n] = v if acc[n] is None else np.maximum(acc[n], v)
    if kind == "hessian":
        return {n: h.hessian() for n, h in acc.items()}
    return dict(acc)


def stored_parts(n: int, nb: int, block: int, bits: int, scheme: str, scale_dtype) -> list[tuple]:
    """How one weight is stored for MatMulNBits, as (suffix, key, shape, dtype): packed codes [N, blocks, bytes];
    scales [N*blocks] in `scale_dtype`; zero points for the `int` and `float` schemes (the symmetric ones use the
    op's default 2^(bits-1)). A float-zero-point weight is stored in `quant.integer_form`: its `blocks` include
    the remainder's digit blocks. The same for the embedding's lookup."""
    blocks = kernel_k(nb * block, block, scheme) // block
    parts = [("qweight", "b", (n, blocks, block * bits // 8), np.uint8), ("scales", "scales", (n * blocks,), scale_dtype)]
    if scheme in ("int", "float"):
        parts.append(("zero_points", "zp", (n * ((blocks * bits + 7) // 8),), np.uint8))
    return parts


def kernel_k(k: int, block: int, scheme: str) -> int:
    """The K a weight's MatMulNBits reads: the weight's, plus a float zero point's remainder digit blocks."""
    return k + (_quant.remainder_blocks(k // block, block) * block if scheme == "float" else 0)


def packed(qw: _quant.QuantizedWeight, bits: int, scale_dtype) -> dict[str, np.ndarray]:
    """The arrays of `stored_parts` (by key) for a quantized weight."""
    b, scales, zp = _quant.pack_matmulnbits(_quant.integer_form(qw, bits, scale_dtype), bits)
    return {"b": b, "scales": scales.astype(scale_dtype), "zp": zp}


def stored_names(base: str, edit: GraphEdit) -> dict:
    """What `decoded_params` gave the kernel of weight `base`, for a reader sharing its stored blocks."""
    scales = base + "/scales_f32" if base + "/scales_f32" in edit.prod else base + ".scales"
    return {"qweight": base + ".qweight", "scales": scales,
            "zero_points": base + ".zero_points" if base + ".zero_points" in edit.inits else None}


def decoded_params(base: str, bits: int, scheme: str, scale_dtype):
    """Nodes turning the stored parameters into what the kernels read: float32 scales. They read initializers only,
    so ONNX Runtime computes them once, when the session is created (constant folding): the file holds float16,
    the kernels get float32, a step pays nothing. Returns (nodes, names: qweight, scales, zero_points or None)."""
    names = {"qweight": base + ".qweight", "scales": base + ".scales",
             "zero_points": base + ".zero_points" if scheme in ("int", "float") else None}
    nodes = []
    if np.dtype(scale_dtype) != np.float32:
        nodes.append(helper.make_node("Cast", [names["scales"]], [base + "/scales_f32"], name=base + "/scales_f32",
                                      to=FLOAT))
        names["scales"] = base + "/scales_f32"
    return nodes, names


def _with_block_sums(x: str, base: str, k: int, block: int, width: int, rank: int | None,
                     edit: GraphEdit, made: set) -> str:
    """Nodes computing the kernel input of a float-zero-point weight, [x, s, s] (one s per digit): s is x's block
    sums, zero-padded to `width` (whole digit blocks). By Reshape + ReduceSum, which read nothing but x: a 0/1
    matrix (x @ S) read K*width floats per linear per step (18 MB a token on SmolLM2) and decoded 4-11% slower.
    The view [..., blocks, block] is a constant where x's rank is known, else built from x's shape."""
    nb = k // block

    def const(name: str, values) -> str:
        if name not in made and name not in edit.inits:
            edit.new_inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
            made.add(name)
        return name

    axes = const("block_sums.axes", [-1])
    nodes = []
    if rank is not None:
        view = const(f"block_sums.view_{rank}d_{nb}x{block}", [0] * (rank - 1) + [nb, block])
    else:
        view = base + "/blocks_view"
        nodes += [helper.make_node("Shape", [x], [base + "/x_shape"], name=base + "/x_shape", end=-1),
                  helper.make_node("Concat", [base + "/x_shape", const(f"block_sums.tail_{nb}x{block}", [nb, block])],
                                   [view], name=view, axis=0)]
    nodes += [helper.make_node("Reshape", [x, view], [base + "/blocks"], name=base + "/blocks"),
              helper.make_node("ReduceSum", [base + "/blocks", axes], [base + "/block_sums"], name=base + "/block_sums",
                               keepdims=0)]
    sums = base + "/block_sums"
    if width > nb:
        pads = ([0] * (2 * rank - 1) + [width - nb]) if rank is not None else [0, width - nb]
        name = f"block_sums.pads_{len(pads)}_{width - nb}"
        nodes.append(helper.make_node("Pad", [sums, const(name, pads)] + (["", axes] if rank is None else []),
                                      [sums + "_padded"], name=sums + "_padded"))
        sums += "_padded"
    with_sums = base + "/with_block_sums"
    nodes.append(helper.make_node("Concat", [x] + [sums] * _quant.REMAINDER_DIGITS, [with_sums], name=with_sums, axis=-1))
    edit.new_nodes += nodes
    return with_sums


def quantize_matmuls(state: ModelState, ctx: PassContext, *, bits: int, block: int, scheme: str, algorithm: str,
                     accuracy_level: int, include: list[str], exclude: list[str], damp: float = _quant.GPTQ_DAMP,
                     act_order: bool = False, sequential: bool = False,
                     clip: bool = False, scale_dtype="float16") -> tuple[dict, list]:
    model = state.onnx_model
    selected, skipped = select_matmuls(model, include, exclude)
    edit = GraphEdit(model)
    inits = edit.inits
    fits, notes = _quant.fit_blocks({n.name: inits[n.input[1]].dims[0] for n in selected}, block, skipped)
    usable = [n for n in selected if n.name in fits]
    hessians, spill, rel_errors, walked = {}, None, [], {}
    lazy = any(_lazy.is_lazy(inits[n.input[1]]) for n in usable)
    act_block = block if accuracy_level == 4 else None
    fit = lambda w, h: _quant.gptq(w, h, bits, block, scheme, damp=damp, act_order=act_order, clip=clip,  # noqa: E731
                                   scale_dtype=scale_dtype)
    if algorithm == "gptq" and usable and (lazy or sequential):
        # layer by layer through the transformers layers: a streaming build cannot run the whole graph, and a
        # sequential fit needs each layer's inputs after the layers before it are quantized
        from ._layerwise_gptq import gptq_walk

        if lazy:  # results parked on disk until written
            spill = _lazy.Spill(ctx.scratch_dir("gptq"))
            keep = lambda name, qw: spill.put(name, qw.arrays())  # noqa: E731
        else:
            keep = walked.__setitem__
        rel_errors = gptq_walk(state, usable, lambda node: _lazy.array(inits[node.input[1]]).T, fit,
                               ctx.calibration_windows(), keep, sequential=sequential, act_block=act_block)
    elif algorithm == "gptq" and usable:
        hessians = activation_stats(model, sorted({n.input[0] for n in usable}), ctx.calibration_windows(),
                                    ctx.threads, "hessian")
    new_nodes, new_inits = edit.new_nodes, edit.new_inits
    streamed, made = 0, set()
    ranks = tensor_ranks(model) if scheme == "float" else {}
    for node in track(usable, desc=f"quantize int{bits} ({algorithm})", unit="layer"):
        src = inits[node.input[1]]
        k, n = src.dims
        base = node.name
        nb = k // block
        parts = stored_parts(n, nb, block, bits, scheme, scale_dtype)
        if _lazy.is_lazy(src):  # streaming build: packed when the writer reaches these tensors
            streamed += 1
            if spill is not None:  # GPTQ'd layer by layer above
                quantized = lambda name=node.name: _quant.QuantizedWeight.from_arrays(spill.get(name))  # noqa: E731
            else:  # RTN, computed only now
                quantized = lambda src=src: _quant.rtn(_lazy.array(src).T, bits, block, scheme, clip,  # noqa: E731
                                                       scale_dtype)
            shared = _lazy.Shared(lambda q=quantized: packed(q(), bits, scale_dtype), len(parts))
            new_inits += [_lazy.tensor(f"{base}.{suffix}", shape, dtype, shared.part(key))
                          for suffix, key, shape, dtype in parts]
            state.effective_weights[base] = EffectiveWeight(lambda q=quantized: q().dequantize(), act_block)
        else:
            w = numpy_helper.to_array(src).T  # [N, K]
            if node.name in walked:  # fitted by the walk, which recorded its error
                qw = walked.pop(node.name)
            else:
                qw = fit(w, hessians[node.input[0]]) if algorithm == "gptq" else _quant.rtn(w, bits, block, scheme, clip,
                                                                                              scale_dtype)
                rel_errors.append(_quant.relative_error(qw.dequantize(), w))
            arrays = packed(qw, bits, scale_dtype)
            new_inits += [numpy_helper.from_array(arrays[key], f"{base}.{suffix}") for suffix, key, _, _ in parts]
        decode, p = decoded_params(base, bits, scheme, scale_dtype)
        new_nodes += decode
        x, extra = node.input[0], (kernel_k(k, block, scheme) - k) // block
        if extra:  # the integer form's remainder digits read x's block sums: [x, blocksums(x) once per digit]
            x = _with_block_sums(x, base, k, block, extra // _quant.REMAINDER_DIGITS * block, ranks.get(x), edit, made)
        new_nodes.append(helper.make_node(
            "MatMulNBits", [x, p["qweight"], p["scales"]] + ([p["zero_points"]] if p["zero_points"] else []),
            [node.output[0]], name=base, domain=MS_DOMAIN, K=kernel_k(k, block, scheme), N=n, bits=bits, block_size=block,
            accuracy_level=accuracy_level))
        edit.remove.add(id(node))
        edit.drop_inits.add(node.input[1])
    edit.commit()
    ensure_opset(model, MS_DOMAIN, 1)
    how = algorithm + (" act-order" if algorithm == "gptq" and act_order else "") + (
        " sequential" if algorithm == "gptq" and sequential else "") + (" clipped" if clip else "")
    state.handoff.quantized.update({n.name: f"int{bits} {how} block{block} {scheme}" for n in usable})
    changes = {"layers_quantized": len(usable), "layers_skipped": len(skipped),
               **_quant.error_summary(rel_errors), "skipped": skipped}
    if streamed and spill is not None:
        notes.append(f"{streamed} weights GPTQ-quantized layer by layer (streaming build: Hessians from the model "
                     "run one decoder layer at a time, as earlier passes left it; results kept on disk until written)")
    elif streamed:
        notes.append(f"{streamed} weights quantized while the artifact is written (streaming build)")
    if scheme == "float" and usable:
        notes.append(f"float zero points stored as integer zero points + the remainder in {_quant.REMAINDER_DIGITS} "
                     f"{bits}-bit digit blocks read against the input's block sums (one MatMulNBits per linear)")
    if np.dtype(scale_dtype) != np.float32 and usable:
        notes.append(f"scales stored in {np.dtype(scale_dtype).name}, cast to float32 when the model is loaded")
    return changes, notes
