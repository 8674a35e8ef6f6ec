#!/usr/bin/env python
"""Write a copy of a model that computes the same fp32 function but whose weights lie off any 4-bit grid.

SmolLM2's published weights sit exactly on the GGUF Q4_1 grid, so a quantizer that matches that grid looks perfect
on it and nowhere else. This rewrite (../shared/FINDINGS.md, "Off the 4-bit grid") rescales channels in pairs that
cancel, as real checkpoints' activation outliers do: each norm's weight ÷ s and the input columns of the linears it
feeds × s; v_proj rows × t and o_proj's matching columns ÷ t (per kv head); up_proj rows × u and down_proj columns
÷ u; the final norm ÷ s and an untied lm_head's columns × s. s, t, u are log-normal (`--sigma`). Topology comes from
the model's architecture description, so any described family without packed projections works.

    python scripts/make_offgrid_model.py builtin:smollm2-135m models/smollm2-offgrid
    python scripts/make_offgrid_model.py ./my-llama models/my-llama-offgrid --sigma 1.0 --seed 3

Prints the largest fp32 logit difference against the original on a random prompt (it should be ~1e-4).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from optpipe import arch, models
from optpipe.recipe import ModelSpec


def rescale(model, sigma: float, seed: int) -> None:
    """Function-preserving channel rescaling, in place (fp32)."""
    desc = arch.describe(model.config)
    if desc.packed:
        raise SystemExit(f"{desc.family}: packed q/k/v and gate/up projections are not handled by this script")
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)

    def factors(n: int) -> torch.Tensor:
        return torch.exp(torch.randn(n, generator=gen) * sigma)

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie
        cfg.tie_word_embeddings = False
        for layer in model.get_submodule(desc.layers):
            for group in desc.groups(cfg):
                if group.source_kind != "norm":
                    continue
                s = factors(cfg.hidden_size)
                desc.scale_norm(layer.get_submodule(group.source).weight, s)
                for name in group.members:
                    layer.get_submodule(name).weight.mul_(s)
            v, o = layer.get_submodule(desc.v), layer.get_submodule(desc.o)
            t = factors(kv_heads * head_dim)
            v.weight.mul_(t[:, None])
            if v.bias is not None:
                v.bias.mul_(t)
            per_query_head = t.reshape(kv_heads, 1, head_dim).expand(kv_heads, heads // kv_heads, head_dim)
            o.weight.div_(per_query_head.reshape(1, -1))
            up, down = layer.get_submodule(desc.up), layer.get_submodule(desc.down)
            u = factors(up.out_features)
            up.weight.mul_(u[:, None])
            if up.bias is not None:
                up.bias.mul_(u)
            down.weight.div_(u)
        s = factors(cfg.hidden_size)
        desc.scale_norm(model.get_submodule(desc.final_norm).weight, s)
        head.weight.mul_(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="model source as a recipe takes it (builtin:smollm2-135m, a directory, a .gguf)")
    ap.add_argument("output", type=Path, help="directory to write (safetensors + config + tokenizer)")
    ap.add_argument("--sigma", type=float, default=0.5, help="log-normal spread of the channel scales")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.output.exists():
        print(f"{a.output} exists; choose a new directory", file=sys.stderr)
        return 2
    model, tokenizer, _ = models.load(ModelSpec(source=a.source))
    model.eval()
    if next(model.parameters()).dtype != torch.float32:
        raise SystemExit(f"{a.source}: loaded as {next(model.parameters()).dtype}; this script rescales fp32 weights")
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 64)))
    with torch.no_grad():
        before = model(ids).logits
    rescale(model, a.sigma, a.seed)
    with torch.no_grad():
        after = model(ids).logits
    models.save_checkpoint(model, tokenizer, a.output)
    print(f"{a.output}: written; max |Δlogit| vs the original {float((after - before).abs().max()):.2e} "
          f"(sigma {a.sigma}, seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
