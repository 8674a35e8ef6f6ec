"""capture_inputs: the rows a module sees, within a token budget, kept whole or as a running summary."""
import numpy as np
import torch

from optpipe import models
from optpipe.passes._torch_calib import capture_inputs
from optpipe.recipe import ModelSpec


def test_captures_rows_within_the_budget_and_reduces_on_the_fly(tiny_llama):
    model = models.load(ModelSpec(source=str(tiny_llama)))[0]
    windows = [np.random.default_rng(i).integers(0, 256, 40) for i in range(3)]
    down = model.model.layers[1].mlp.down_proj
    rows = capture_inputs(model, {"down": down}, windows, max_tokens=100)
    assert rows["down"].shape == (100, 128) and rows["down"].dtype == torch.float32  # 40 + 40 + 20 tokens
    seen = []
    hook = down.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        for w in windows:
            model(torch.as_tensor(w[:100 - sum(len(s) for s in seen)]).reshape(1, -1), use_cache=False)
            if sum(len(s) for s in seen) >= 100:
                break
    hook.remove()
    torch.testing.assert_close(rows["down"], torch.cat(seen))
    peak = capture_inputs(model, {"down": down}, windows,
                          reduce=lambda prev, x: x.abs().amax(0) if prev is None else torch.maximum(prev, x.abs().amax(0)))
    torch.testing.assert_close(peak["down"], torch.cat([capture_inputs(model, {"d": down}, [w])["d"] for w in windows])
                               .abs().amax(0))
    assert not down._forward_pre_hooks  # hooks removed
