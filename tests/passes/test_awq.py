"""AWQ: the same function in float, a scale chosen per group that lowers the quantized output error."""
import numpy as np
import pytest
import torch

from optpipe import models
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
    # Llama, no GQA sharing broken: q/k/v, gate/up, down after up; o after v only without grouped-query heads
    assert res.modified and res.changes["groups_scaled"] == 2 * 3
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
