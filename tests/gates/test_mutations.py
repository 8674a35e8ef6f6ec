"""Mutation suite: deliberately broken candidates of the real SmolLM2 (fp32 weights, not a random-init model whose
layers barely matter), each refused by the accuracy gate at its *default* thresholds, with the reason naming the
statistic. The matched-nothing recipe is refused by the coverage gate (tests/gates/test_coverage.py) and a 2-bit
build by both gates (tests/test_integration_smollm2.py)."""
import copy

import numpy as np
import pytest
import torch

from optpipe import data, models
from optpipe.gates import accuracy
from optpipe.recipe import AccuracyGate, DataSpec, ModelSpec
from optpipe.targets.torch_eager import TorchEagerRunner

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = models.load(ModelSpec(source="builtin:smollm2-135m"))
    windows = data.token_windows(DataSpec(source="builtin:evaluation", max_tokens=1024, window=512), tokenizer)
    reference = TorchEagerRunner(model, 2)
    logits = [reference.logits(w) for w in windows.windows]  # the reference once, for every mutation

    class Cached:
        def logits(self, ids):
            return logits[next(i for i, w in enumerate(windows.windows) if w is ids)]

    return model, windows.windows, Cached()


class Skip(torch.nn.Module):
    """A decoder layer that was lost: the residual stream passes through untouched."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def corrupt_scales(m):
    """Per-output-channel scales of one projection off by up to 4x (what a mis-stored INT4/INT8 scale does to
    the dequantized weight)."""
    w = m.model.layers[3].mlp.down_proj.weight
    g = torch.Generator().manual_seed(0)
    w.data *= torch.exp(torch.empty(w.shape[0], 1).uniform_(-1.4, 1.4, generator=g))


def drop_layer(m):
    m.model.layers[5] = Skip()


def swap_lm_head(m):
    """lm_head rows shifted by one token (a head saved against another vocabulary order); untied from the input
    embedding so only the head is wrong."""
    m.lm_head.weight = torch.nn.Parameter(torch.roll(m.lm_head.weight.detach().clone(), 1, dims=0),
                                          requires_grad=False)


def two_bit(m):
    """Every decoder linear at 2 bits (symmetric RTN per output channel)."""
    for layer in m.model.layers:
        for lin in [mod for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]:
            w = lin.weight.data
            scale = w.abs().amax(dim=1, keepdim=True) / 1.5
            lin.weight.data = torch.clamp(torch.round(w / scale - 0.5), -2, 1).add(0.5) * scale


@pytest.mark.parametrize("mutate", [corrupt_scales, drop_layer, swap_lm_head, two_bit], ids=lambda f: f.__name__)
def test_broken_candidate_is_refused_naming_the_statistic(smollm2, mutate):
    model, windows, reference = smollm2
    broken = copy.deepcopy(model)
    mutate(broken)
    metrics = accuracy.compare(reference, TorchEagerRunner(broken, 2), windows)
    result = accuracy.check(metrics, AccuracyGate())
    assert result.passed is False
    assert any("perplexity delta" in f and "upper 95% bound" in f for f in result.failures), result.failures
    lo, hi = metrics["ppl_delta_pct_ci95"]
    assert lo > 3.0  # not a near miss: the whole interval is beyond the default threshold


def test_unmutated_copy_passes(smollm2):
    """The suite's control: the same copy without a mutation passes, so the refusals above are the mutations'."""
    model, windows, reference = smollm2
    metrics = accuracy.compare(reference, TorchEagerRunner(copy.deepcopy(model), 2), windows)
    assert accuracy.check(metrics, AccuracyGate()).passed and abs(metrics["ppl_delta_pct"]) < 1e-3
    assert np.isfinite(metrics["mean_kl"])
