"""runtime/ipex without IPEX: the runner's contract (it wraps any HF causal LM; IPEX only swaps its modules), the
loader's refusals and the install hint. With IPEX, tests/targets/test_cpu_ipex.py builds and reloads artifacts."""
import importlib.util

import numpy as np
import pytest
import torch

from optpipe import models
from optpipe.errors import ArtifactError, InputError, RecipeError
from optpipe.recipe import ModelSpec
from optpipe.runtime import ipex as rt_ipex
from optpipe.runtime.torch_modules import TorchRunner

HAVE_IPEX = importlib.util.find_spec("intel_extension_for_pytorch") is not None


@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    model, _, _ = models.load(ModelSpec(source=str(tiny_llama)))
    return model.eval()


def test_runner_logits_and_greedy_tokens_match_the_eager_model(tiny_model):
    ids = np.arange(5, 21)
    runner = rt_ipex.IpexRunner(tiny_model, threads=1)
    eager = TorchRunner(tiny_model, 1, {"mode": "dynamic"}, compile=False)
    np.testing.assert_allclose(runner.logits(ids), eager.logits(ids), atol=1e-4)
    seen = []
    gen = runner.generate(ids, 6, on_token=seen.append)
    assert gen.tokens == eager.generate(ids, 6).tokens and len(gen.tokens) == 6
    assert seen == gen.tokens  # every new token is streamed (the put of the prompt is not one)
    assert gen.prefill_seconds > 0 and gen.decode_seconds > 0
    assert runner.precisions() == {} and runner.max_length == tiny_model.config.max_position_embeddings


def test_runner_refuses_sampling(tiny_model):
    with pytest.raises(InputError, match="decode greedily"):
        rt_ipex.IpexRunner(tiny_model, 1).generate(np.arange(4), 2, pick=lambda logits: int(np.argmax(logits)))


@pytest.mark.skipif(HAVE_IPEX, reason="checks the environment without IPEX")
def test_missing_ipex_is_a_recipe_error_with_the_install_hint(tmp_path):
    with pytest.raises(RecipeError, match=r"not importable .*scripts/check_ipex\.sh"):
        rt_ipex.import_ipex()
    with pytest.raises(RecipeError, match="cpu-ipex"):
        rt_ipex.load_ipex_artifact(tmp_path, 1)


@pytest.mark.skipif(not HAVE_IPEX, reason="intel-extension-for-pytorch not installed")
def test_a_directory_without_settings_is_not_an_ipex_artifact(tmp_path):
    with pytest.raises(ArtifactError, match=r"ipex\.json is missing"):
        rt_ipex.load_ipex_artifact(tmp_path, 1)


def test_bf16_model_runs_under_autocast(tiny_model):
    model = type(tiny_model)(tiny_model.config).to(torch.bfloat16).eval()
    out = rt_ipex.IpexRunner(model, 1).logits(np.arange(3, 9))
    assert out.dtype == np.float32 and out.shape == (6, tiny_model.config.vocab_size) and np.isfinite(out).all()
