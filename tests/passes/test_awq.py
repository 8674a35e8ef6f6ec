"""AWQ: the same function in float, a scale chosen per group that lowers the quantized output error."""
import numpy as np
import pytest
import torch

from optpipe import models, quant
from optpipe.builder import check
from optpipe.errors import RecipeError
from optpipe.passes.awq import Awq, AwqConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec

from ..conftest import torch_recipe


def _with_outlier_channels(model):
    """A few input channels with large activations (as real LLMs have): what AWQ's scales exist for."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] *= 25.0
            layer.post_attention_layernorm.weight[[5, 60]] *= 25.0
    return model


def test_awq_keeps_the_float_function_and_lowers_the_quantized_error(tiny_llama):
    model = _with_outlier_channels(models.load(ModelSpec(source=str(tiny_llama)))[0])
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        before = model(ids).logits
    windows = [np.random.default_rng(i).integers(0, 256, 64) for i in range(3)]
    res = Awq(AwqConfig(block_size=32)).call(ModelState("torch", torch_model=model),
                                              PassContext(calibration=lambda: windows))
    # Llama per layer: q/k/v, o after v (2 query heads per kv head share a scale), gate/up, down after up; the head
    # is tied to the embedding, so it is left alone and says why
    assert res.modified and res.changes["groups_scaled"] == 2 * 4
    assert "tied" in res.changes["skipped"]["lm_head"]
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)
    # alpha 0 (no scaling) is on the grid, so the search can only match or beat plain RTN; with outliers it beats it
    assert 0 < res.changes["output_error_ratio_mean"] < 1.0
    assert 0 < res.changes["alpha_mean"] <= 1


def test_awq_must_come_before_fuse(tiny_llama):
    recipe = torch_recipe(tiny_llama, [{"name": "fuse"}, {"name": "awq"}, {"name": "quantize-int4"}])
    with pytest.raises(RecipeError, match=r"passes\[1\] \(awq\): must come before `fuse`"):
        check(recipe)


def _offgrid(model, sigma=0.8):
    """The repo's off-grid rewrite (scripts/make_offgrid_model.py): every weight off its grid, same float function."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "scripts" / "make_offgrid_model.py"
    spec = importlib.util.spec_from_file_location("make_offgrid_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.rescale(model, sigma, seed=1)
    return model


def _quantized_logits(model, ids, block=32):
    with torch.no_grad():
        for lin in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
            lin.weight.copy_(torch.from_numpy(quant.rtn(lin.weight.numpy(), 4, block, "float").dequantize()))
        return model(ids).logits


@pytest.mark.parametrize("weight_grid", [1, 5])
def test_awq_undoes_an_offgrid_rescaling_including_v_to_o_and_the_untied_head(tiny_llama, weight_grid):
    """Channel scales moved between a norm and its linears, v and o (grouped-query), up and down, the final norm and
    an untied head: AWQ scales every one of those pairs back (the head too), the float function stays, and RTN
    after it loses far less than RTN on the rescaled weights."""
    def load():
        return _offgrid(models.load(ModelSpec(source=str(tiny_llama)))[0])

    ids = torch.as_tensor(np.random.default_rng(9).integers(0, 256, (1, 96)))
    reference = load()
    with torch.no_grad():
        exact = reference(ids).logits
    plain = _quantized_logits(load(), ids)
    model = load()
    windows = [np.random.default_rng(i).integers(0, 256, 96) for i in range(4)]
    res = Awq(AwqConfig(block_size=32, scheme="float", weight_grid=weight_grid)).call(
        ModelState("torch", torch_model=model), PassContext(calibration=lambda: windows))
    assert res.changes["groups_scaled"] == 2 * 4 + 1 and res.changes["skipped"] == {}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, exact, atol=2e-4, rtol=1e-4)
    after = _quantized_logits(model, ids)
    plain_err, awq_err = ((plain - exact).pow(2).mean().item(), (after - exact).pow(2).mean().item())
    assert awq_err < 0.5 * plain_err, (awq_err, plain_err)
    assert (res.changes["beta_mean"] > 0) == (weight_grid > 1)


def test_awq_scales_v_to_o_once_per_kv_row_under_grouped_query_attention(tiny_llama):
    """o_proj's columns of query heads that share a kv head get the same scale, the one v's row was divided by."""
    model = models.load(ModelSpec(source=str(tiny_llama)))[0]
    layer = model.model.layers[0].self_attn
    v0, o0 = layer.v_proj.weight.detach().clone(), layer.o_proj.weight.detach().clone()
    windows = [np.random.default_rng(i).integers(0, 256, 64) for i in range(2)]
    Awq(AwqConfig(block_size=32, lm_head=False)).call(ModelState("torch", torch_model=model),
                                                     PassContext(calibration=lambda: windows))
    # v rows were divided by s; the q/k/v group's scale multiplied column 0 by some c, the same for every row
    row_scale = v0[:, 0] / layer.v_proj.weight[:, 0].detach()  # s / c
    col_scale = (layer.o_proj.weight.detach() / o0)[0]  # o columns multiplied by s of the row they read
    head_dim, group = 16, 2  # 4 query heads, 2 kv heads
    expected = row_scale.reshape(2, 1, head_dim).expand(2, group, head_dim).reshape(-1)
    torch.testing.assert_close(col_scale / col_scale[0], expected / expected[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(row_scale, torch.ones_like(row_scale))
