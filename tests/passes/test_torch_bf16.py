"""bf16-autocast: refused before loading where the CPU has no native bf16, unless it may fall back to fp32."""
import json

import pytest

import optpipe
from optpipe.cli import main

from ..conftest import AVX2_ONLY, TORCH_INT4, fake_cpu, torch_recipe, write_recipe


def test_bf16_is_refused_before_loading_without_native_support(tiny_llama, tmp_path, monkeypatch, capsys):
    from optpipe import models

    fake_cpu(monkeypatch, AVX2_ONLY)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, [{"name": "bf16-autocast"}]))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "passes[0] (bf16-autocast)" in err and "no avx512_bf16 or AMX" in err and "fallback: fp32" in err
    assert not (tmp_path / "art").exists()


def test_bf16_fallback_keeps_fp32_and_records_it(tiny_llama, tmp_path, monkeypatch):
    fake_cpu(monkeypatch, AVX2_ONLY)
    recipe = torch_recipe(tiny_llama, [{"name": "bf16-autocast", "fallback": "fp32"}] + TORCH_INT4)
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"] == {"dtype": "float32", "native_bf16": False}
    assert res.manifest["target"]["dtypes"] == ["float32"]
    assert res.manifest["environment"]["isa"]["avx512_bf16"] is False


def test_bf16_flags_without_fast_bf16_matmuls_are_refused_too(tiny_llama, tmp_path, monkeypatch, capsys):
    """An AVX-512 BF16 Xeon ran torch's bf16 matmul at 0.55x fp32: the flag alone does not make bf16 worth it, so a
    measured ratio below 1 refuses the bf16 recipe (naming the figure) and makes `fallback: fp32` keep fp32."""
    from ..conftest import AVX512_BF16

    fake_cpu(monkeypatch, AVX512_BF16, bf16_speedup=0.55)
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, [{"name": "bf16-autocast"}]))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "has avx512_bf16 but torch's bf16 matmul measured 0.55x the fp32 speed" in err and "fallback: fp32" in err
    res = optpipe.build(torch_recipe(tiny_llama, [{"name": "bf16-autocast", "fallback": "fp32"}] + TORCH_INT4),
                        output=tmp_path / "fb", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"] == {"dtype": "float32", "native_bf16": False}


def test_bf16_is_used_only_where_it_is_measurably_faster(monkeypatch):
    """The decision rests on the lower end of the ratio's 95% interval: a point just over 1.0 with an interval
    reaching below it (an AMX Xeon measured 0.95-1.0x, a point that flipped the verdict between runs) is refused."""
    from optpipe import hw
    from optpipe.passes.torch_bf16 import bf16_shortfall

    from ..conftest import AVX512_BF16

    fake_cpu(monkeypatch, AVX512_BF16)
    monkeypatch.setattr(hw, "bf16_matmul_speedup", lambda *shapes: (1.02, 0.97))
    assert "measured 1.02x the fp32 speed here (95% interval from 0.97x" in bf16_shortfall()
    monkeypatch.setattr(hw, "bf16_matmul_speedup", lambda *shapes: (1.7, 1.55))
    assert bf16_shortfall() is None


def test_bf16_is_timed_on_the_models_own_matmul_shapes(tiny_llama, tmp_path, monkeypatch, capsys):
    """On an AMX Xeon a 2048x1024 matmul ran 1.1x faster in bf16 and SmolLM2's 576-wide ones 0.3-0.6x: the build was
    let through and its decode measured 0.84x. The measurement times the model's decode-step shapes (its config,
    before loading; the same shapes, so the same cached figure, in the pass), a stand-in only where they are unknown."""
    from optpipe import hw
    from optpipe.passes.torch_bf16 import bf16_shortfall

    from ..conftest import AVX512_BF16

    fake_cpu(monkeypatch, AVX512_BF16)
    asked = []
    monkeypatch.setattr(hw, "bf16_matmul_speedup", lambda *shapes: asked.append(shapes) or (0.5, 0.45))
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, [{"name": "bf16-autocast"}]))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "0.50x the fp32 speed here (95% interval from 0.45x; this model's decode-step matmuls)" in err
    cfg = json.loads((tiny_llama / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    assert set(asked[0][0]) == {(h, h, 2 * layers), (kv, h, 2 * layers), (inter, h, 2 * layers), (h, inter, layers),
                                (cfg["vocab_size"], h, 1)}
    res = optpipe.build(torch_recipe(tiny_llama, [{"name": "bf16-autocast", "fallback": "fp32"}]),
                        output=tmp_path / "fb", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"]["native_bf16"] is False and set(asked) == {asked[0]}
    assert "this model's decode-step matmuls" in res.manifest["passes"][0]["notes"][0]
    asked.clear()
    assert "a decode-shaped 2048x1024 matmul" in bf16_shortfall({"model_type": "llama", "hidden_size": 64})
    assert asked == [()]  # widths missing: the stand-in


def test_the_bf16_matmul_measurement_is_a_positive_ratio():
    from optpipe import hw

    ratio, low = hw.bf16_matmul_speedup(((96, 64, 3), (64, 96, 1)), rounds=3)
    assert 0.01 < low <= ratio < 100
