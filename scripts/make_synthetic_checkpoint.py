#!/usr/bin/env python
"""Write a checkpoint with the exact shapes and config of Llama-2-13B (random weights, fixed seed, bf16
safetensors shards, a byte-level tokenizer) so the streaming build can be exercised without the real weights.

    python scripts/make_synthetic_checkpoint.py models/llama2-13b-synthetic            # all 40 layers, ~26 GB
    python scripts/make_synthetic_checkpoint.py models/llama2-13b-4layers --layers 4   # same shapes, 4 layers
    python scripts/make_synthetic_checkpoint.py models/llama-1b --shape llama-1b       # TinyLlama-1.1B's shapes

`llama-1b` (decode-bandwidth benchmarks, `scripts/bench_cpu.py --model ... --speed-only`) takes SmolLM2's tokenizer
and vocabulary size (49,152), so llama.cpp's converter recognises the tokenizer and both engines share token ids.

Tensors are generated and written one at a time (peak memory: one tensor), into shards of ~`--shard-gb`.
Weights are N(0, 0.02) like a fresh Llama init, norms are 1; the model is noise, but the shapes, dtypes,
names, index and config are those of meta-llama/Llama-2-13b-hf.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

import torch

LLAMA2_13B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
    "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
}


LLAMA_1B = {  # TinyLlama-1.1B's layer shapes (grouped-query attention, 4 KV heads) with SmolLM2's vocabulary
    **LLAMA2_13B, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 49152, "max_position_embeddings": 2048, "bos_token_id": 1,
    "eos_token_id": 2,
}
SHAPES = {"llama2-13b": LLAMA2_13B, "llama-1b": LLAMA_1B}


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        specs += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (h, h)),
                  (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                  (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.post_attention_layernorm.weight", (h,)),
                  (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                  (f"{p}.mlp.down_proj.weight", (h, i))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i + 3 for i, ch in enumerate(alphabet)} | {"<unk>": 0, "<s>": 1, "</s>": 2},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def plan_shards(specs, shard_bytes: float) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in specs:
        n = 2 * math.prod(shape)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    return shards + [cur] if cur else shards


def write_shard(path: Path, tensors, make, bar) -> None:
    """safetensors written incrementally: the header (names, shapes, offsets) is known before any data, so each
    tensor is generated, written and dropped in turn."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            t = make(name, shape)
            f.write(t.view(torch.int16).numpy().tobytes())
            bar.update(t.numel() * 2)
            del t


def main() -> int:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's own depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    a = ap.parse_args()
    base = SHAPES[a.shape]
    cfg = {**base, "num_hidden_layers": a.layers or base["num_hidden_layers"]}
    a.out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(cfg)
    total = sum(2 * math.prod(s) for _, s in specs)
    gen = torch.Generator().manual_seed(a.seed)

    def make(name, shape):
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * cfg["initializer_range"]).to(torch.bfloat16)

    shards = plan_shards(specs, a.shard_gb * 1e9)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing tensors") as bar:
        for i, tensors in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_shard(a.out / name, tensors, make, bar)
            weight_map.update({t: name for t, _ in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (a.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (a.out / "config.json").write_text(json.dumps(cfg, indent=1))
    if a.shape == "llama-1b":
        from optpipe import models
        from optpipe.recipe import ModelSpec

        models.load(ModelSpec(source="builtin:smollm2-135m"))[1].save_pretrained(str(a.out))
    else:
        byte_tokenizer().save_pretrained(str(a.out))
    print(f"{a.out}: {len(specs)} tensors, {total / 1e9:.1f} GB in {len(shards)} shards, "
          f"{cfg['num_hidden_layers']} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
