#!/usr/bin/env python
"""INT4 quantizers side by side on one model: RTN, optpipe's GPTQ and AutoRound, optionally after optpipe's AWQ.

Every decoder linear is quantized to INT4 (integer zero point, blocks of 32 along the input, float16 scales: the
scheme of `recipes/smollm2-135m-cpu-int4-awq.yaml`); lm_head and the embedding stay fp32. Each quantizer sees the
same calibration tokens (the built-in calibration text, 32 windows of 256 = 8,192 tokens, optpipe's default
budget). The quantized weights are put back into a copy of the model in float (fake quantization, PyTorch), and
the accuracy gate's own arithmetic (`optpipe.gates.accuracy.compare`: paired block-bootstrap 95% interval) scores
it against the fp32 model on the built-in evaluation text (12,288 tokens requested).

    python scripts/make_offgrid_model.py builtin:smollm2-135m models/smollm2-offgrid
    python scripts/int4_quantizers.py models/smollm2-offgrid --methods rtn gptq autoround --awq --json out.json

AutoRound (`auto-round`, the 4-bit algorithm neural-compressor 3.x offers) is not a dependency of optpipe; install
it beside it without letting pip touch torch: `pip install --no-deps auto-round py-cpuinfo`. It runs with its
defaults (200 iterations a decoder block, its learning rates), batch 4. docs/dependencies.md has the figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np
import torch

from optpipe import data, hw, models, quant
from optpipe.errors import OptpipeError
from optpipe.gates import accuracy
from optpipe.passes.awq import Awq, AwqConfig
from optpipe.pipeline import ModelState, PassContext, run_passes
from optpipe.recipe import DataSpec, ModelSpec
from optpipe.runtime.torch_modules import TorchRunner

BITS, BLOCK, SCHEME = 4, 32, "int"


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def hessians(model, linears: dict, windows) -> dict[str, np.ndarray]:
    """GPTQ's input Hessian of each linear over the calibration windows (quant.HessianSum, as the passes use it)."""
    sums = {name: quant.HessianSum() for name in linears}

    def hook(name):
        def add(_module, args) -> None:  # returns None: a pre-hook's return value would replace the input
            sums[name].add(args[0].detach().float())
        return add

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        with torch.inference_mode():
            for ids in windows:
                model(torch.as_tensor(ids).reshape(1, -1), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: s.hessian() for name, s in sums.items()}


def quantize_rtn_gptq(model, method: str, windows) -> list[float]:
    """Quantize `model`'s decoder linears in place; returns each weight's relative error."""
    linears = decoder_linears(model)
    found = hessians(model, linears, windows) if method == "gptq" else {}
    errors = []
    for name, m in linears.items():
        w = m.weight.detach().float().numpy()
        if method == "gptq":
            qw = quant.gptq(w, found[name], BITS, BLOCK, SCHEME, act_order=True, scale_dtype=np.float16)
        else:
            qw = quant.rtn(w, BITS, BLOCK, SCHEME, scale_dtype=np.float16)
        deq = qw.dequantize()
        errors.append(quant.relative_error(deq, w))
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(deq))
    return errors


def quantize_autoround(model, tokenizer, windows, iters: int):
    """AutoRound with its defaults on the same calibration tokens; returns (quantized model, relative errors)."""
    from auto_round import AutoRound

    before = {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}
    batches = [torch.as_tensor(w, dtype=torch.long).reshape(1, -1) for w in windows]
    rounder = AutoRound(model, tokenizer, bits=BITS, group_size=BLOCK, sym=False, iters=iters, nsamples=len(batches),
                        seqlen=int(windows[0].size), batch_size=4, dataset=batches, device_map="cpu", amp=False,
                        enable_torch_compile=False, seed=0)
    quantized, _ = rounder.quantize()
    after = decoder_linears(quantized)
    return quantized, [quant.relative_error(after[n].weight.detach().float().numpy(), w.numpy())
                       for n, w in before.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model directory or builtin:smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq", "autoround"])
    ap.add_argument("--awq", action="store_true", help="run optpipe's awq pass first (as the int4-awq recipe does)")
    ap.add_argument("--iters", type=int, default=200, help="AutoRound iterations per decoder block")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    try:
        threads = hw.threads(a.threads, "--threads")
    except ValueError as e:
        ap.error(str(e))
    if "autoround" in a.methods and not hw.importable("auto_round"):
        ap.error("--methods autoround: needs auto-round beside optpipe (pip install --no-deps auto-round py-cpuinfo)")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:
        model, tok, _ = models.load(ModelSpec(source=a.model))
    except OptpipeError as e:
        ap.error(f"model: {e}")
    calib = data.token_windows(DataSpec(source="builtin:calibration", window=256, max_tokens=8192), tok, None,
                               "calibration").windows
    evaluation = data.token_windows(DataSpec(source="builtin:evaluation", window=512, max_tokens=12288), tok, None,
                                    "evaluation").windows
    awq_seconds = None
    if a.awq:  # function-preserving in fp32: the reference below is the rescaled model
        t0 = time.perf_counter()
        run_passes([Awq(AwqConfig(block_size=BLOCK, scheme=SCHEME, weight_grid=5))],
                   ModelState("torch", torch_model=model, tokenizer=tok),
                   PassContext(calibration=lambda: calib, threads=threads), log=lambda m: print(m, file=sys.stderr))
        awq_seconds = round(time.perf_counter() - t0, 1)
    reference = TorchRunner(model, threads)
    rows = []
    for method in a.methods:
        candidate = copy.deepcopy(model)
        t0 = time.perf_counter()
        if method == "autoround":
            candidate, errors = quantize_autoround(candidate, tok, calib, a.iters)
        else:
            errors = quantize_rtn_gptq(candidate, method, calib)
        seconds = round(time.perf_counter() - t0, 1)
        r = accuracy.compare(reference, TorchRunner(candidate, threads), evaluation)
        rows.append({"method": ("awq + " if a.awq else "") + method, "seconds": seconds, "awq_seconds": awq_seconds,
                     "iters": a.iters if method == "autoround" else None, "ppl_delta_pct": r["ppl_delta_pct"],
                     "ppl_delta_pct_ci95": r["ppl_delta_pct_ci95"], "mean_kl": r["mean_kl"],
                     "top1_agreement": r.get("top1_agreement"), "tokens": r["tokens"],
                     "weight_rel_error_mean": round(float(np.mean(errors)), 5)})
        print(json.dumps(rows[-1]), flush=True)
    env = hw.environment()
    print(f"\n{env['cpu']}, isa: {', '.join(k for k, v in env['isa'].items() if v) or 'none'}, {threads} thread(s)")
    print("| method | ΔPPL [95%] | mean KL | quantizer seconds |\n|---|---|---|---|")
    for row in rows:
        lo, hi = row["ppl_delta_pct_ci95"]
        print(f"| {row['method']} | {row['ppl_delta_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}] | {row['mean_kl']:.3f} | "
              f"{row['seconds']} |")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"model": a.model, "environment": env, "threads": threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
