"""scripts/int4_quantizers.py: the quantizers it compares really leave every decoder linear on a 4-bit grid (lm_head
untouched), GPTQ's Hessians come from the calibration forward, and each row is a ΔPPL with its interval."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from optpipe import models
from optpipe.recipe import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import int4_quantizers as script  # noqa: E402


def _windows(n=4, size=64, seed=0):
    return list(np.random.default_rng(seed).integers(1, 200, (n, size)))


def test_every_decoder_linear_lands_on_a_4_bit_grid(tiny_llama):
    for method in ("rtn", "gptq"):
        model, _, _ = models.load(ModelSpec(source=str(tiny_llama)))
        head = model.lm_head.weight.detach().clone()
        errors = script.quantize_rtn_gptq(model, method, _windows())
        linears = script.decoder_linears(model)
        assert len(errors) == len(linears) > 0 and all(0 < e < 1 for e in errors)
        for name, m in linears.items():
            blocks = m.weight.detach().reshape(m.weight.shape[0], -1, script.BLOCK)
            levels = max(len(torch.unique(blocks[r, b])) for r in range(blocks.shape[0]) for b in range(blocks.shape[1]))
            assert levels <= 16, (method, name, levels)
        assert torch.equal(model.lm_head.weight, head)


def test_hessians_are_the_inputs_gram_matrix(tiny_llama):
    model, _, _ = models.load(ModelSpec(source=str(tiny_llama)))
    name, lin = next(iter(script.decoder_linears(model).items()))
    seen = []
    hook = lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    windows = _windows(n=2)
    with torch.inference_mode():
        for ids in windows:
            model(torch.as_tensor(ids).reshape(1, -1), use_cache=False)
    hook.remove()
    x = torch.cat(seen).double()
    got = script.hessians(model, {name: lin}, windows)[name]  # the model still runs: the hook returns nothing
    np.testing.assert_allclose(got, (2 / x.shape[0] * x.T @ x).numpy(), rtol=1e-6, atol=1e-9)


def test_rows_report_the_gate_statistic(tiny_llama, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert script.main([str(tiny_llama), "--methods", "rtn", "gptq", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["rtn", "gptq"]
    for r in rows:
        lo, hi = r["ppl_delta_pct_ci95"]
        assert lo <= r["ppl_delta_pct"] <= hi and r["tokens"] > 0 and r["mean_kl"] >= 0
    assert "| rtn |" in capsys.readouterr().out
