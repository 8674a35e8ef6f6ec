"""Which linears lose the most when quantized: one (layer, projection) group at a time, fake-quantized, against fp32.

Mixed precision (INT8 for the linears 4 bits cannot carry) should follow a measurement, not a guess. For every
decoder layer and every projection group of the family's description (q/k/v together and gate/up together, as
`fuse` packs them into one MatMul; o; down) the weights are quantized and dequantized in place (`quant.rtn`,
block-wise, with the scheme given), the model runs on the *calibration* text (never the evaluation text the
accuracy gate scores, so choosing layers here cannot fit the gate), and the mean KL divergence of the next-token
distributions from the unquantized model's is recorded; the weights are restored before the next group.

`optpipe tune` measures it once per model and scheme (cached on disk) when the recipe's `search.sensitivity`
asks, and gives the N most sensitive groups to the INT4 pass's `int8.include`; `scripts/layer_sensitivity.py`
prints the same table for a model.
"""
from __future__ import annotations

import re
import time

import torch

from .. import arch, quant
from ..progress import track


def projections(desc) -> dict[str, tuple[str, ...]]:
    """Label (the fused name where `fuse` packs linears, as the graph names them) -> its linears: linears that
    share one graph node share one format."""
    out: dict[str, list[str]] = {}
    for module in desc.linears:
        fused = next((f for f, members in desc.fused.items() if module in members), module)
        out.setdefault(fused, []).append(module)
    return {k: tuple(v) for k, v in out.items()}


def pattern(desc, layer: int, label: str, members: tuple[str, ...]) -> str:
    """A regex on MatMul node names matching the group in layer `layer`, fused or not."""
    names = "|".join(re.escape(n) for n in dict.fromkeys((label, *members)))
    return rf"^{re.escape(desc.layers)}\.{layer}\.({names})$"


@torch.inference_mode()
def _mean_kl(model, windows, ref_logp) -> float:
    kls = []
    for ids, ref in zip(windows, ref_logp):
        logp = torch.log_softmax(model(torch.as_tensor(ids)[None]).logits[0].float(), -1)
        kls.append((ref.exp() * (ref - logp)).sum(-1))
    return float(torch.cat(kls).mean())


@torch.inference_mode()
def measure(model, windows, *, bits: int = 4, block_size: int = 32, zero_point: str = "float",
            clip: bool = True, scale_dtype: str = "float16", log=print) -> list[dict]:
    """Every (layer, group): mean KL of that group alone quantized, most sensitive first. Each row carries the
    `pattern` that selects the group's MatMul in the exported graph."""
    model.eval()
    desc = arch.describe(model.config)
    groups = projections(desc)
    ref = [torch.log_softmax(model(torch.as_tensor(w)[None]).logits[0].float(), -1) for w in windows]
    rows, t0 = [], time.perf_counter()
    for i in track(range(model.config.num_hidden_layers), desc="sensitivity", unit="layer"):
        layer = model.get_submodule(desc.layer_prefix(i)[:-1])
        for label, members in groups.items():
            mods = [layer.get_submodule(m) for m in members]
            if any(m.weight.shape[1] % block_size for m in mods):
                continue  # the pass leaves such a linear unquantized: nothing to choose
            saved = [m.weight.data.clone() for m in mods]
            for m in mods:
                w = m.weight.data.float().numpy()
                deq = quant.rtn(w, bits, block_size, zero_point, clip=clip,
                                scale_dtype=scale_dtype).dequantize()
                m.weight.data.copy_(torch.from_numpy(deq).to(m.weight.dtype))
            rows.append({"layer": i, "projection": label, "mean_kl": _mean_kl(model, windows, ref),
                         "params": sum(m.weight.numel() for m in mods), "pattern": pattern(desc, i, label, members)})
            for m, w in zip(mods, saved):
                m.weight.data.copy_(w)
    log(f"sensitivity: {len(rows)} groups in {time.perf_counter() - t0:.0f} s")
    rows.sort(key=lambda r: -r["mean_kl"])
    return rows
