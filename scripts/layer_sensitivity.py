#!/usr/bin/env python
"""Which linears lose the most when quantized: one (layer, projection) at a time, fake-quantized, against fp32.

The measurement is `optpipe.tune.sensitivity` (what `optpipe tune` uses for `search.sensitivity`); this prints
it as a table for a model, with the include regex of the top N:

    python scripts/layer_sensitivity.py models/smollm2-offgrid --tokens 2048 --top 12

Point it at the model as the quantizer will see it (after AWQ/SmoothQuant, e.g. a checkpoint saved after those
passes). Calibration text only: choosing layers here cannot fit the accuracy gate's evaluation text.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from optpipe import data, models
from optpipe.recipe import DataSpec, ModelSpec
from optpipe.tune.sensitivity import measure


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model directory or builtin:smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens scored (windows of 256)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--zero-point", default="float", choices=["float", "int", "symmetric"])
    ap.add_argument("--scale-dtype", default="float16", choices=["float16", "float32"], help="as the pass stores them")
    ap.add_argument("--top", type=int, default=10, help="how many to name in the include list")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok, _ = models.load(ModelSpec(source=a.model))
    windows = data.token_windows(DataSpec(source="builtin:calibration", window=256, max_tokens=a.tokens), tok, None,
                                 "calibration").windows
    rows = measure(model, windows, bits=a.bits, block_size=a.block, zero_point=a.zero_point,
                   scale_dtype=a.scale_dtype, log=lambda m: print(m, file=sys.stderr))
    total = sum(r["params"] for r in rows)
    print(f"| layer | projection | mean KL (int{a.bits} alone) | share of decoder weights |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['projection']} | {r['mean_kl']:.5f} | {r['params'] / total:.1%} |")
    top = rows[:a.top]
    print(f"\ntop {a.top}: {sum(r['params'] for r in top) / total:.1%} of decoder weights; int8.include:\n  "
          + json.dumps([r["pattern"] for r in top]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "bits": a.bits, "block": a.block, "tokens": a.tokens, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
