#!/usr/bin/env python
"""Which linears lose the most when quantized: one (layer, projection) at a time, fake-quantized, against fp32.

Mixed precision (INT8 for the linears 4 bits cannot carry) should follow a measurement, not a guess. For every
decoder layer and every projection of the family's description (q/k/v together, as `fuse` packs them; o; gate/up
together; down) the weights are quantized and dequantized in place (`optpipe.quant.rtn`, block-wise, float zero
point, clip search — the cpu-onnx INT4 format), the model is run on the *calibration* text (never the evaluation
text the accuracy gate scores, so choosing layers here cannot fit the gate), and the mean KL divergence of the
next-token distributions from the unquantized model's is recorded. The weights are restored before the next one.

    python scripts/layer_sensitivity.py models/smollm2-offgrid --tokens 2048 --top 12

Point it at the model as the quantizer will see it (after AWQ/SmoothQuant, e.g. a checkpoint saved after those
passes). Prints a table, most sensitive first, and the include regex of the top N; --json writes every value.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

from optpipe import arch, data, models, quant
from optpipe.recipe import DataSpec, ModelSpec


def projections(desc) -> dict[str, tuple[str, ...]]:
    """Label (the fused name where `fuse` packs linears, as the graph names them) -> its linears: linears that
    share one graph node share one format."""
    out: dict[str, list[str]] = {}
    for module in desc.linears:
        fused = next((f for f, members in desc.fused.items() if module in members), module)
        out.setdefault(fused, []).append(module)
    return {k: tuple(v) for k, v in out.items()}


@torch.inference_mode()
def mean_kl(model, windows, ref_logp) -> float:
    kls = []
    for ids, ref in zip(windows, ref_logp):
        logp = torch.log_softmax(model(torch.as_tensor(ids)[None]).logits[0].float(), -1)
        kls.append((ref.exp() * (ref - logp)).sum(-1))
    return float(torch.cat(kls).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model directory or builtin:smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens scored (windows of 256)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--top", type=int, default=10, help="how many to name in the include regex")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok, _ = models.load(ModelSpec(source=a.model))
    model.eval()
    windows = data.token_windows(DataSpec(source="builtin:calibration", window=256, max_tokens=a.tokens), tok, None,
                                 "calibration").windows
    with torch.inference_mode():
        ref = [torch.log_softmax(model(torch.as_tensor(w)[None]).logits[0].float(), -1) for w in windows]
    desc = arch.describe(model.config)
    groups = projections(desc)
    rows, t0 = [], time.time()
    for i in range(model.config.num_hidden_layers):
        layer = model.get_submodule(desc.layer_prefix(i)[:-1])
        for label, members in groups.items():
            mods = [layer.get_submodule(m) for m in members]
            saved = [m.weight.data.clone() for m in mods]
            for m in mods:
                w = m.weight.data.float().numpy()
                m.weight.data.copy_(torch.from_numpy(quant.rtn(w, a.bits, a.block, "float", clip=True).dequantize()))
            rows.append({"layer": i, "projection": label, "mean_kl": mean_kl(model, windows, ref),
                         "params": sum(m.weight.numel() for m in mods)})
            for m, w in zip(mods, saved):
                m.weight.data.copy_(w)
        print(f"layer {i}: {time.time() - t0:.0f} s", file=sys.stderr)
    rows.sort(key=lambda r: -r["mean_kl"])
    total = sum(r["params"] for r in rows)
    print(f"| layer | projection | mean KL (int{a.bits} alone) | share of decoder weights |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['projection']} | {r['mean_kl']:.5f} | {r['params'] / total:.1%} |")
    top = rows[:a.top]
    names = "|".join(sorted(f"{r['layer']}\\.{re.escape(r['projection'])}" for r in top))
    print(f"\ntop {a.top}: {sum(r['params'] for r in top) / total:.1%} of decoder weights; include regex:\n"
          f"  {re.escape(desc.layers)}\\.({names})$")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "bits": a.bits, "block": a.block, "tokens": a.tokens, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
