"""Quantized modules on torch's CPU kernels match their own dequantized weights; the static-cache runner
decodes the same tokens as a dynamic cache."""
import numpy as np
import pytest
import torch

from optpipe import quant as _quant
from optpipe.runtime.torch_modules import Int4WeightOnlyLinear, Int8Linear, TorchRunner, _pack_nibbles, _unpack_nibbles


def test_nibble_packing_round_trips():
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    assert torch.equal(_unpack_nibbles(_pack_nibbles(codes)), codes)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_module_matches_its_dequantized_weight(group):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (96, 256)).astype(np.float32)
    qw = _quant.rtn(w, 4, group, "float")
    mod = Int4WeightOnlyLinear.from_codes(qw.q.reshape(w.shape), qw.scale, qw.minimum, None)
    # the module's grid is the quantizer's grid, up to bf16 scales and zero points
    assert np.abs(mod.dequantize().numpy() - qw.dequantize()).max() < 0.02 * np.abs(w).max()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = x.float() @ mod.dequantize().T
    got = mod(x).float()
    assert torch.allclose(got, expected, atol=0.05, rtol=0.02)
    assert mod(x.float()).dtype == torch.float32


@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_module_matches_float(dynamic):
    torch.manual_seed(0)
    w = torch.randn(80, 64) * 0.05
    mod = Int8Linear.from_float(w, torch.zeros(80), dynamic)
    assert (mod.dequantize() - w).abs().max() <= mod.scales.max() / 2 + 1e-6
    x = torch.randn(5, 64)
    rel = (mod(x) - x @ w.T).norm() / (x @ w.T).norm()
    assert rel < 0.03


def test_static_cache_runner_decodes_like_dynamic(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = np.arange(10, 30)
    dynamic = TorchRunner(model, 1).generate(ids, 12).tokens
    static = TorchRunner(model, 1, {"mode": "static", "max_length": 64}).generate(ids, 12).tokens
    assert static == dynamic
    with pytest.raises(ValueError, match="exceeds the static KV cache of 64"):
        TorchRunner(model, 1, {"mode": "static", "max_length": 64}).generate(ids, 60)


@pytest.mark.parametrize("kv_cache", [None, {"mode": "static", "max_length": 64}])
def test_a_runner_does_not_keep_its_model_alive(tiny_llama, kv_cache):
    """A dropped runner frees its model: a process that builds or gates many models (a test suite, a tuner) must
    not hold every one of them (a cache keyed by the bound `forward` once did, and CI ran out of memory)."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    runner = TorchRunner(model, 1, kv_cache)
    runner.generate(np.arange(10, 20), 4)
    alive = weakref.ref(model)
    del model, runner
    gc.collect()
    assert alive() is None
