"""GPTQ with Hessians measured one decoder layer at a time: the streaming build, and sequential GPTQ anywhere.

The in-memory path without `sequential` runs the whole ONNX graph on the calibration text once and reads every
quantized MatMul's input. A model larger than memory cannot run that way, and a sequential fit needs each linear's
input *after* the linears before it are quantized, so here the calibration windows go through the model's own
transformers layers one at a time (`optpipe.layerwise.walk`, over the checkpoint's files or, in memory,
`checkpoint.ModelWeights`): at layer i the inputs of its linears are reduced to X^T X, the layer's selected weights
are GPTQ-quantized (read through the graph, so fusion and any earlier rewrite apply) and handed to the caller (the
streaming build parks them on disk until the artifact is written), and the layer is dropped. Without `sequential`
the activations passed on are the unquantized model's, as in the one-run graph path, so both fit against the same
Hessians; with it, each fitted linear is put back quantized before the next site is measured. Memory: one layer's
weights, its Hessians, and the calibration activations.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import arch
from .. import quant as _quant
from ..errors import BuildError
from ..layerwise import LayerStep, walk
from ..progress import bar


def input_site(name: str, config) -> tuple[int, str]:
    """(layer index, module path in the layer) whose input feeds MatMul `name` (ONNX MatMuls are named after the
    module they replace, fused ones after the fused name); lm_head is (num_layers, "lm_head")."""
    desc = arch.describe(config)
    layers = config.num_hidden_layers
    if name == desc.lm_head:
        return layers, LayerStep.HEAD
    head, _, rest = name.partition(desc.layers + ".")
    index, _, module = rest.partition(".")
    if not head and index.isdigit() and int(index) < layers:
        try:
            return int(index), desc.input_of(module)
        except KeyError:
            pass
    raise BuildError(f"GPTQ in a streaming build: cannot tell which decoder-layer input feeds MatMul {name!r} "
                     f"(the {desc.family} description knows {', '.join(desc.linears + tuple(desc.fused))} and "
                     f"{desc.lm_head})")


def weight_source(state):
    """What a layer-by-layer walk reads: the streaming build's checkpoint, or the model in memory (the one the graph
    was exported from: passes before export, e.g. AWQ, changed it in place)."""
    from ..checkpoint import ModelWeights

    if state.torch_model is None:
        return state.checkpoint
    return ModelWeights(state.torch_model)


def _graph_weights(nodes, weight: Callable[[object], np.ndarray], config) -> dict:
    """MatMul name -> EffectiveWeight reading W [N, K] from the graph, for the nodes a walk can place in a layer
    (the others are left to the checkpoint's weights)."""
    from ..layerwise import EffectiveWeight

    out = {}
    for node in nodes:
        try:
            input_site(node.name, config)
        except BuildError:
            continue
        out[node.name] = EffectiveWeight(lambda n=node: weight(n))
    return out


def gptq_walk(state, nodes, weight: Callable[[object], np.ndarray], quantize: Callable[[np.ndarray, np.ndarray], object],
              windows, keep: Callable[[str, object], None], *, sequential: bool = False,
              act_block: int | None = None) -> list[float]:
    """`gptq_by_layer` over the model the graph came from (`weight_source`), its layers running with what the graph
    computes: the graph's own float MatMul weights (read by `weight`) and the weights earlier passes registered."""
    from .. import lazy as _lazy
    from ._onnx import initializer_map

    inits = initializer_map(state.onnx_model)
    floats = [n for n in state.onnx_model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
              and not _lazy.is_lazy(inits[n.input[1]])]
    source = weight_source(state)
    effective = {**_graph_weights(floats, weight, source.config), **state.effective_weights}
    return gptq_by_layer(source, nodes, weight, quantize, windows, keep, effective, sequential=sequential,
                         act_block=act_block)


def gptq_by_layer(checkpoint, nodes, weight: Callable[[object], np.ndarray],
                  quantize: Callable[[np.ndarray, np.ndarray], object], windows, keep: Callable[[str, object], None],
                  effective: dict[str, Callable], *, sequential: bool = False,
                  act_block: int | None = None) -> list[float]:
    """GPTQ every node in `nodes` (ONNX MatMuls), layer by layer. `weight(node)` gives W [N, K]; `quantize(W, H)`
    a QuantizedWeight, handed to `keep(name, qw)`. Layers run with the `effective` weights of earlier passes (what
    the graph computes so far). `sequential`: each linear's Hessian is measured with every linear before it (in
    its layer and the layers before) already quantized, and the walk goes on with the quantized layer's outputs
    (`act_block`: the quantized kernel rounds its input to int8 in blocks of that size); otherwise every Hessian
    comes from the unquantized model. Returns relative weight errors."""
    layers = checkpoint.config.num_hidden_layers
    desc = arch.describe(checkpoint.config)
    by_layer: dict[int, dict[str, list]] = {}
    for node in nodes:
        i, site = input_site(node.name, checkpoint.config)
        by_layer.setdefault(i, {}).setdefault(site, []).append(node)
    order = {site: n for n, site in enumerate(dict.fromkeys(desc.input_of(m) for m in desc.linears))}
    errors = []
    head = layers in by_layer
    reducer = _quant.HessianSum.reducer(torch.float32)
    for step in walk(checkpoint, windows, last_layer=max(by_layer), head=head, effective=dict(effective),
                     desc="GPTQ calibration (layer by layer)"):
        sites = by_layer.pop(step.index, None)
        if not sites:
            continue
        modules = {s: None if step.is_head else step.module.get_submodule(s) for s in sites}
        with bar(sum(len(v) for v in sites.values()), f"GPTQ layer {step.index}", "weight", leave=False) as b:
            if not sequential or step.is_head:
                _fit(sites, step.observe(modules, reducer), weight, quantize, keep, errors, b)
                continue
            prefix = desc.layer_prefix(step.index)
            for site in sorted(sites, key=lambda s: order.get(s, len(order))):
                fitted = _fit({site: sites[site]}, step.observe({site: modules[site]}, reducer), weight, quantize,
                              keep, errors, b)
                for node, qw in fitted:
                    step.layers.put_weight(step.module, node.name[len(prefix):], qw.dequantize(), act_block)
            step.outputs = None  # the walk recomputes this layer's outputs with its quantized weights
    return errors


def _fit(sites, sums, weight, quantize, keep, errors, b) -> list:
    fitted = []
    for site, site_nodes in sites.items():
        h = sums.pop(site).hessian()  # scaled in place: the MLP-down Hessian of a 13B model is 0.75 GB
        for node in site_nodes:
            w = weight(node)
            qw = quantize(w, h)
            errors.append(_quant.relative_error(qw.dequantize(), w))
            keep(node.name, qw)
            fitted.append((node, qw))
            b.update(1)
            del w
        del h
    return fitted
