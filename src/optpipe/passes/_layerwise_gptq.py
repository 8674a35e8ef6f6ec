"""GPTQ for the streaming build: Hessians measured one decoder layer at a time.

The in-memory path runs the whole ONNX graph on the calibration text and reads every quantized MatMul's input. A
model larger than memory cannot run that way, so here the calibration windows go through the checkpoint's own
transformers layers one at a time (`optpipe.layerwise.walk`): at layer i the inputs of its linears are reduced to
X^T X, the layer's selected weights are GPTQ-quantized (read through the graph's lazy loaders, so fusion and any
earlier rewrite apply), parked on disk until the artifact is written, and the layer is dropped. The activations
passed on are the fp32 model's, as in the in-memory path, so both fit against the same Hessians. Memory: one
layer's weights, its Hessians, and the calibration activations.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import arch
from .. import lazy as _lazy
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


def gptq_by_layer(checkpoint, nodes, weight: Callable[[object], np.ndarray],
                  quantize: Callable[[np.ndarray, np.ndarray], object], windows, spill: _lazy.Spill,
                  effective: dict[str, Callable]) -> list[float]:
    """GPTQ every node in `nodes` (ONNX MatMuls), layer by layer. `weight(node)` gives W [N, K]; `quantize(W, H)`
    a QuantizedWeight, stored in `spill` under the node's name. Layers run with the `effective` weights of earlier
    passes (what the graph computes so far). Returns relative weight errors."""
    layers = checkpoint.config.num_hidden_layers
    by_layer: dict[int, dict[str, list]] = {}
    for node in nodes:
        i, site = input_site(node.name, checkpoint.config)
        by_layer.setdefault(i, {}).setdefault(site, []).append(node)
    errors = []
    head = layers in by_layer
    for step in walk(checkpoint, windows, last_layer=max(by_layer), head=head, effective=dict(effective),
                     desc="GPTQ calibration (layer by layer)"):
        sites = by_layer.pop(step.index, None)
        if not sites:
            continue
        modules = {s: None if step.is_head else step.module.get_submodule(s) for s in sites}
        sums = step.observe(modules, _quant.HessianSum.reducer(torch.float32))
        with bar(sum(len(v) for v in sites.values()), f"GPTQ layer {step.index}", "weight", leave=False) as b:
            _fit_layer(sites, sums, weight, quantize, spill, errors, b)
    return errors


def _fit_layer(sites, sums, weight, quantize, spill, errors, b) -> None:
    for site, site_nodes in sites.items():
        h = sums.pop(site).hessian()  # scaled in place: the MLP-down Hessian of a 13B model is 0.75 GB
        for node in site_nodes:
            w = weight(node)
            qw = quantize(w, h)
            errors.append(_quant.relative_error(qw.dequantize(), w))
            spill.put(node.name, qw.arrays())
            b.update(1)
            del w, qw
        del h
