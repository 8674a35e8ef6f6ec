import numpy as np
import pytest
import torch

from optpipe import models
from optpipe.errors import RecipeError
from optpipe.passes.smoothquant import SmoothQuant, SmoothQuantConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec, recipe_from_dict

from ..conftest import tiny_recipe


def test_smoothquant_preserves_the_function(tiny_llama):
    model, _, _ = models.load(ModelSpec(source=str(tiny_llama)))
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        before = model(ids).logits
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    windows = [np.random.default_rng(i).integers(0, 256, 32) for i in range(2)]
    res = SmoothQuant(SmoothQuantConfig(alpha=0.5)).call(ModelState("torch", torch_model=model),
                                                          PassContext(calibration=lambda: windows))
    assert res.changes["groups_smoothed"] == 4
    assert not torch.equal(w0, model.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_smoothquant_must_come_before_export(tiny_llama):
    with pytest.raises(RecipeError, match=r"passes\[1\] \(smoothquant\).*put it before `export`"):
        recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "export"}, {"name": "smoothquant"}]))
    with pytest.raises(RecipeError, match="needs a onnx model at the end"):
        recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "smoothquant"}]))
