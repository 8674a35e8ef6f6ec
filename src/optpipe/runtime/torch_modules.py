"""PyTorch-native CPU runtime: quantized Linear modules on torch's own CPU kernels, and the decode loop.

The kernels are the ones torchao's CPU int4/int8 layouts call (`aten._weight_int4pack_mm_for_cpu`,
`aten._weight_int8pack_mm`, `aten._int_mm` on oneDNN/VNNI), used directly so that an artifact is plain
tensors in safetensors and needs nothing beyond torch to load. The packed int4 layout depends on the CPU's
ISA, so artifacts store the plain codes and pack them when loaded.
"""
from __future__ import annotations

import contextvars
import functools

import numpy as np
import torch

from .. import quant
from .generation import Generation, OnToken, Pick, decode

INT4_GROUPS = (32, 64, 128)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> [N, K/2] uint8, even column in the low nibble (quant.pack_bits' layout)."""
    return torch.from_numpy(quant.pack_bits(codes.to(torch.uint8).numpy(), 4))


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], -1).reshape(packed.shape[0], -1)


class Int4WeightOnlyLinear(torch.nn.Module):
    """y = x @ W^T (+ b) with W[n, k] = (q - 8) * scale[n, g] + zero[n, g] per group of `group_size` along k.

    The zero point is a float (not an integer code), so asymmetric grids with a float minimum — GGUF's Q4_1,
    GPTQ/RTN `float` scheme — are represented exactly up to the bf16 scales the kernel takes. Activations are
    computed in bf16 (the CPU kernel's fast path) and returned in the input's dtype."""

    kind = "int4-weight-only"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        ng = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, ng, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.bfloat16, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._packed = None
        self._scales_zeros = None

    @classmethod
    def from_codes(cls, codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, bias) -> Int4WeightOnlyLinear:
        """codes [N, K] in 0..15 with w = codes*scale + minimum per group (float zero point)."""
        n, k = codes.shape
        group = k // scale.shape[1]
        mod = cls(k, n, group, bias is not None)
        mod.qweight.copy_(_pack_nibbles(torch.from_numpy(codes.astype(np.uint8))))
        s = torch.from_numpy(scale.astype(np.float32))
        mod.scales.copy_(s.to(torch.bfloat16))
        # (q - 8) * s + zero == q * s + minimum  =>  zero = minimum + 8 s (computed in fp32, then rounded once)
        mod.zeros.copy_((torch.from_numpy(minimum.astype(np.float32)) + 8 * s).to(torch.bfloat16))
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        mod.prepare()
        return mod

    def prepare(self) -> None:
        """Pack for this CPU (after construction or after loading the plain tensors)."""
        codes = _unpack_nibbles(self.qweight).to(torch.int32)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        self._scales_zeros = torch.stack([self.scales.t(), self.zeros.t()], -1).contiguous()

    def dequantize(self) -> torch.Tensor:
        codes = _unpack_nibbles(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        w = (codes - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self._packed,
                                                       self.group_size, self._scales_zeros)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class Int8Linear(torch.nn.Module):
    """Per-output-channel symmetric INT8 weights. `dynamic`: activations quantized per token at run time and
    multiplied on int8 units (VNNI via oneDNN); otherwise weight-only (bf16 activations)."""

    def __init__(self, in_features: int, out_features: int, dynamic: bool, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._wt = None
        self._scales_bf16 = None

    @property
    def kind(self) -> str:
        return "int8-dynamic" if self.dynamic else "int8-weight-only"

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias, dynamic: bool) -> Int8Linear:
        w = weight.detach().float()
        q, scale = quant.symmetric_int8(w.numpy(), axis=0)  # one scale per output row
        mod = cls(w.shape[1], w.shape[0], dynamic, bias is not None)
        mod.qweight.copy_(torch.from_numpy(q))
        mod.scales.copy_(torch.from_numpy(scale))
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        mod.prepare()
        return mod

    def prepare(self) -> None:
        # Tensors read from safetensors can sit at any byte offset; the int8 CPU kernel crashes (SIGSEGV) on
        # a weight that is not 64-byte aligned, so such a weight gets its own (aligned) storage.
        if self.qweight.data_ptr() % 64:
            self.qweight = self.qweight.clone()
        self._wt = self.qweight.t().contiguous()
        self._scales_bf16 = self.scales.to(torch.bfloat16)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.dynamic:
            xf = x2.float()
            xs = (xf.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
            xq = torch.round(xf / xs).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self._wt).float() * (xs * self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self._scales_bf16)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


QUANTIZED_MODULES = (Int4WeightOnlyLinear, Int8Linear)


def _is_conv1d(mod) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer that stores its weight [in, out]."""
    return type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers.")


def linear_weight(mod) -> torch.Tensor | None:
    """A plain linear module's weight as [out, in] (a Conv1D's transposed view); None for any other module."""
    return mod.weight if type(mod) is torch.nn.Linear else mod.weight.T if _is_conv1d(mod) else None


def select_linears(model, include: list[str], exclude: list[str]) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Plain linear modules (nn.Linear, Conv1D) by qualified name, filtered by regexes; returns (chosen, skipped
    name -> why)."""
    linears = {name: mod for name, mod in model.named_modules() if linear_weight(mod) is not None}
    chosen, skipped = quant.select(list(linears), include, exclude)
    others = {name: (type(mod).__name__, own) for name, mod in model.named_modules() if (own := _own_weights(mod))}
    for name in quant.select(list(others), include, exclude)[0]:
        kind, own = others[name]
        shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in own)
        skipped[name] = f"{kind} ({shapes}) is not a linear layer: it stays in float"
    return {name: linears[name] for name in chosen}, skipped


def _own_weights(mod) -> list[tuple[str, torch.Tensor]]:
    """The >=2-D float parameters of a module that is not a linear or an embedding (a mixture of experts' router
    and stacked experts): no quantized module replaces it, so it is named as skipped and counted as float."""
    if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding, *QUANTIZED_MODULES)) or _is_conv1d(mod):
        return []
    return [(n, p) for n, p in mod.named_parameters(recurse=False) if p.dim() >= 2 and p.is_floating_point()]


def set_module(model, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def untie_lm_head(model) -> bool:
    """Give lm_head its own weight (before quantizing it while the embedding stays float)."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return True


def quantized_layout(model) -> dict[str, dict]:
    """name -> how the module is quantized: written to the artifact, read back to rebuild the modules."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int4WeightOnlyLinear):
            out[name] = {"kind": mod.kind, "in_features": mod.in_features, "out_features": mod.out_features,
                         "group_size": mod.group_size, "bias": mod.bias is not None}
        elif isinstance(mod, Int8Linear):
            out[name] = {"kind": mod.kind, "in_features": mod.in_features, "out_features": mod.out_features,
                         "bias": mod.bias is not None}
    return out


def build_quantized(entry: dict, device=None) -> torch.nn.Module:
    if entry["kind"] == "int4-weight-only":
        return Int4WeightOnlyLinear(entry["in_features"], entry["out_features"], entry["group_size"], entry["bias"], device)
    if entry["kind"] in ("int8-dynamic", "int8-weight-only"):
        return Int8Linear(entry["in_features"], entry["out_features"], entry["kind"] == "int8-dynamic", entry["bias"], device)
    raise ValueError(f"unknown quantized module kind {entry['kind']!r}")


_FILLED = contextvars.ContextVar("optpipe_static_cache_filled", default=None)
STATIC_ATTENTION = "optpipe_static_sdpa"


def _static_cache_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the filled part of a static cache only. A StaticCache hands attention the whole
    preallocated buffer (masked), so without this every decode step costs attention over `max_length`
    positions; the runner sets how many positions are filled before each forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = _FILLED.get()
    if n is not None and key.shape[-2] > n:
        key, value = key[..., :n, :], value[..., :n, :]
        if attention_mask is not None and attention_mask.shape[-1] > n:
            attention_mask = attention_mask[..., :n]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_static_cache_attention(model) -> None:
    """Route the model's attention through `_static_cache_sdpa`, with SDPA's masks (a name transformers does not
    know gets no mask function, and a sliding-window layer then attends to every position)."""
    from transformers import AttentionInterface

    if getattr(model.config, "attn_logit_softcapping", None):
        return  # SDPA cannot soft-cap scores (Gemma 2): keep the model's own attention over the whole buffer
    AttentionInterface.register(STATIC_ATTENTION, _static_cache_sdpa)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers 4.51 (the IPEX environment) builds masks without this registry
        pass
    else:
        AttentionMaskInterface.register(STATIC_ATTENTION, sdpa_mask)
    model.config._attn_implementation = STATIC_ATTENTION


class TorchRunner:
    """Batch-1 logits and greedy decoding for a PyTorch causal LM, with a static (preallocated) or dynamic KV
    cache; optionally the model's forward compiled by torch.compile (Inductor)."""

    def __init__(self, model, threads: int, kv_cache: dict | None = None, compile: bool = False):
        self.model = model
        self.threads = threads
        self.kv_cache = kv_cache or {"mode": "dynamic"}
        if self.kv_cache.get("mode") == "static" and not compile:  # compiled graphs keep the full buffer
            use_static_cache_attention(model)
        self._forward = torch.compile(model.forward, dynamic=False) if compile else model.forward
        self._cache_kw = cache_keyword(model.forward)

    def with_threads(self, threads: int):
        """This runner at another thread count (torch reads the count at each call)."""
        self.threads = threads
        return self

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1), use_cache=False)
        return out.logits[0].float().numpy()

    def _new_cache(self, needed: int):
        from transformers import StaticCache

        if self.kv_cache.get("mode") == "static":
            limit = int(self.kv_cache["max_length"])
            if needed > limit:
                raise ValueError(f"prompt + new tokens = {needed} exceeds the static KV cache of {limit} tokens")
            return StaticCache(config=self.model.config, max_cache_len=limit)
        return dynamic_cache(self.model.config)

    @property
    def max_length(self) -> int:
        if self.kv_cache.get("mode") == "static":
            return int(self.kv_cache["max_length"])
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 31)

    def precisions(self) -> dict[str, str]:
        return module_precisions(self.model)

    def storage(self) -> dict:
        """Bytes and bits per weight of the modules as this runtime holds them (runtime/storage.py)."""
        from .storage import torch_storage

        return torch_storage(self.model)

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None,
                 pick: Pick | None = None, on_token: OnToken | None = None) -> Generation:
        torch.set_num_threads(self.threads)
        ids = np.asarray(ids, dtype=np.int64)
        nxt = torch.empty((1, 1), dtype=torch.long)
        pos = torch.empty((1,), dtype=torch.long)
        held = {}

        def prefill():
            held["cache"] = self._new_cache(ids.size + max_new_tokens)
            _FILLED.set(ids.size)
            out = self._forward(torch.as_tensor(ids).reshape(1, -1), **{self._cache_kw: held["cache"]}, use_cache=True,
                                cache_position=torch.arange(ids.size))
            return out.logits[0, -1].float().numpy()

        def step(tok, position):
            nxt[0, 0] = tok
            pos[0] = position
            _FILLED.set(position + 1)
            out = self._forward(nxt, **{self._cache_kw: held["cache"]}, use_cache=True, cache_position=pos)
            return out.logits[0, -1].float().numpy()

        try:
            with torch.inference_mode():
                return decode(prefill, step, ids.size, max_new_tokens, eos_token_id, pick, on_token)
        finally:
            _FILLED.set(None)


# -- transformers compatibility (the IPEX environment pins transformers 4.51.3) --

def dtype_keyword() -> str:
    """transformers 5 takes `dtype`; 4.x (the IPEX environment pins 4.51.3) takes `torch_dtype`."""
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def cache_keyword(forward) -> str:
    """The KV-cache argument of a transformers forward: `cache` from 5.x's rename (`past_key_values` is removed in
    5.40), `past_key_values` before it (the IPEX environment's 4.51.3). A bound method is looked up by its function:
    caching the method itself would keep every model it was asked about alive."""
    return _cache_keyword(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=None)
def _cache_keyword(function) -> str:
    """Cached per function: the layer-by-layer reference asks once per layer call."""
    import inspect

    try:
        return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def output_cache(out):
    """The cache a transformers forward returned: `out.cache` since 5.x's rename (reading `past_key_values` logs a
    deprecation), `out.past_key_values` before it."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def dynamic_cache(config):
    """transformers' DynamicCache; 4.x (the IPEX environment pins 4.51.3) takes no config."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


# -- packed projections (cpu-torch `fuse`), rebuilt when an artifact is loaded --

class FusedProjection(torch.nn.Module):
    """Holds the fused Linear (`linear`) and the last input it saw with its output."""

    def __init__(self, linear: torch.nn.Module, sizes: list[int]):
        super().__init__()
        self.linear = linear
        self.sizes = sizes
        self._last: tuple | None = None

    def output(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._last is None or self._last[0] is not x:
            self._last = (x, torch.split(self.linear(x), self.sizes, dim=-1))
        return self._last[1]


class ProjectionSlice(torch.nn.Module):
    """Stands where q_proj (etc.) stood: slice `index` of the holder's fused output. The holder is not a
    registered submodule here (it is one of the parent), so the weights appear once in the state dict."""

    def __init__(self, holder: FusedProjection, index: int):
        super().__init__()
        object.__setattr__(self, "holder", holder)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.holder.output(x)[self.index]
        if self.index == len(self.holder.sizes) - 1:
            self.holder._last = None  # the group is complete: drop the reference to its input
        return out


def fuse_projections(model, groups: list[tuple[str, str, tuple[str, ...]]], device=None) -> None:
    """Apply the rewrite for `groups` (from `fusable`); with device='meta' it only rebuilds the structure (load)."""
    for parent_name, fused_name, parts in groups:
        parent = model.get_submodule(parent_name)
        linears = [getattr(parent, p) for p in parts]
        sizes = [lin.out_features for lin in linears]
        bias = all(lin.bias is not None for lin in linears)
        fused = torch.nn.Linear(linears[0].in_features, sum(sizes), bias=bias, device=device or linears[0].weight.device,
                                dtype=linears[0].weight.dtype)
        if device != "meta":
            with torch.no_grad():
                fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
                if bias:
                    fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
        holder = FusedProjection(fused, sizes)
        setattr(parent, fused_name, holder)
        for i, p in enumerate(parts):
            setattr(parent, p, ProjectionSlice(holder, i))


def module_precisions(model) -> dict[str, str]:
    """Module holding matmul weights -> precision: "int4"/"int8" for the quantized modules, else the weight's float
    dtype (linears, and the >=2-D weights of other modules: see `_own_weights`)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int4WeightOnlyLinear):
            out[name] = "int4"
        elif isinstance(mod, Int8Linear):
            out[name] = "int8"
        elif isinstance(mod, torch.nn.Linear) or _is_conv1d(mod):
            out[name] = str(mod.weight.dtype).removeprefix("torch.")
        elif own := _own_weights(mod):  # a mixture of experts' router or experts: float, and counted as such
            out[name] = str(own[0][1].dtype).removeprefix("torch.")
    return out
