"""Fixtures: tiny random-init Llama/Qwen2 models (built from a config, saved locally) with a byte-level tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


def _byte_tokenizer(reverse: bool = False):
    """One token a byte; `reverse`: the same 256 tokens with other ids (a tokenizer that is not this one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, reverse=reverse))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def make_tiny(path: Path, arch: str = "llama", layers: int = 2, **shape) -> Path:
    """A random-init model of any transformers decoder family, from its config (`arch` is its model_type)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    common.update(shape)
    common.setdefault("head_dim", common["hidden_size"] // common["num_attention_heads"])  # Qwen3 defaults to 128
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common))
    with torch.no_grad():  # larger weights than the default init, so logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


def tiny_recipe(model_dir: Path, passes: list, **gates) -> dict:
    return {
        "name": "tiny",
        "model": str(model_dir),
        "target": "cpu-onnx",
        "passes": passes,
        "calibration": {"source": "builtin:calibration", "max_tokens": 512, "window": 128},
        "evaluation": {"source": "builtin:evaluation", "max_tokens": 512, "window": 128},
        "gates": {"accuracy": gates.get("accuracy", {"max_ppl_delta_pct": 5.0}),
                  "speed": gates.get("speed", {"min_decode_speedup": 0.05, "prompt_tokens": 16, "new_tokens": 8,
                                               "repeats": 1, "threads": 1})},
    }


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return p


FUSED_INT4 = [{"name": "export"}, {"name": "fuse"}, {"name": "static-kv-cache", "max_length": 256},
              {"name": "quantize-int4", "block_size": 32, "accuracy_level": 0}]

# cpu-torch: INT4 linears, INT8 lm_head, static KV cache
TORCH_INT4 = [{"name": "quantize-int4", "block_size": 32, "exclude": ["lm_head"]},
              {"name": "quantize-int8", "include": ["^lm_head$"]},
              {"name": "static-kv-cache", "max_length": 128}]


def torch_recipe(model_dir: Path, passes: list, **gates) -> dict:
    return {**tiny_recipe(model_dir, passes, **gates), "target": "cpu-torch"}


AVX2_ONLY = frozenset({"avx2", "fma", "f16c"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16"}


def fake_cpu(monkeypatch, flags: frozenset, bf16_speedup: float | None = None) -> None:
    """Pretend the CPU has `flags`; its measured bf16/fp32 matmul speed ratio is `bf16_speedup` (default: 1.7 with
    avx512_bf16, as an EPYC measured, 0.3 without)."""
    from optpipe import hw

    monkeypatch.setattr(hw, "cpu_flags", lambda: flags)
    ratio = bf16_speedup if bf16_speedup is not None else (1.7 if "avx512_bf16" in flags else 0.3)
    monkeypatch.setattr(hw, "bf16_matmul_speedup", lambda *shapes: (ratio, ratio))  # (point, lower end of its 95% interval)


@pytest.fixture(scope="session")
def built_artifact(tiny_llama, tmp_path_factory):
    """(path, digest) of one emitted tiny INT4 artifact, shared by the tests that tamper with copies of it."""
    import optpipe

    out = tmp_path_factory.mktemp("built") / "art"
    res = optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    return out, res.digest


@pytest.fixture
def artifact_copy(built_artifact, tmp_path):
    """A fresh copy of `built_artifact` to break."""
    import shutil

    dst = tmp_path / "art"
    shutil.copytree(built_artifact[0], dst, symlinks=True)
    return dst
