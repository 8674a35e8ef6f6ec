"""A model larger than memory, one decoder layer at a time: read a layer's weights from the checkpoint, run it, drop it.

Two users: the fp32 reference of the streaming build's gates (`targets/torch_layerwise.py`), and the calibration
passes of the streaming build (GPTQ, SmoothQuant), which push the calibration windows through the model layer by
layer and measure each layer's inputs on the way (`walk`). Both use the architecture's own transformers modules,
so they compute what the eager fp32 model computes; memory holds one layer's weights plus the activations.

Weights stay in their stored dtype and each matmul upcasts its weight to fp32 as it runs (bf16/fp16 -> fp32 is
exact): activations and arithmetic are fp32 throughout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from . import arch
from .models import architecture_class, rotary_module
from .progress import track
from .runtime.torch_modules import cache_keyword, dynamic_cache


class Fp32Linear(torch.nn.Linear):
    """A Linear whose weight stays in its stored dtype and is upcast to fp32 for each matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())


class Int8ActLinear(Fp32Linear):
    """Fp32Linear whose input is rounded to int8 per block of `act_block` along K (symmetric, scale max|x|/127),
    as ONNX Runtime's MatMulNBits does with accuracy_level 4: a calibration walk then sees what that kernel sees."""

    act_block: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(*x.shape[:-1], -1, self.act_block)
        scale = xb.abs().amax(-1, keepdim=True) / 127
        xq = torch.where(scale > 0, torch.round(xb / torch.where(scale > 0, scale, 1)) * scale, 0)
        return super().forward(xq.reshape(x.shape))


class CheckpointLayers:
    """The pieces of a described decoder (`optpipe.arch`) built from a LazyCheckpoint on demand."""

    def __init__(self, checkpoint):
        self.ck = checkpoint
        self.config = checkpoint.config
        # SDPA cannot soft-cap attention scores (Gemma 2): eager attention there, with explicit masks
        self.eager = bool(arch.setting(self.config, "attn_logit_softcapping"))
        self.config._attn_implementation = "eager" if self.eager else "sdpa"
        self.num_layers = self.config.num_hidden_layers
        self.layer_cls = architecture_class(self.config, "DecoderLayer")
        self.norm_cls = architecture_class(self.config, "RMSNorm")
        self.rotary = rotary_module(self.config)
        self.desc = arch.describe(self.config)
        self.windows = self.desc.windows(self.config)
        # one rotary base per layer type (Gemma 3): the layer's type picks its table
        self.rope_types = None if hasattr(self.rotary, "inv_freq") else list(self.config.layer_types)
        self.final_softcap = arch.setting(self.config, "final_logit_softcapping")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[1, S, hidden] fp32 hidden states for token ids [S] (only the rows used are converted)."""
        h = self.ck.get_torch(self.desc.embed + ".weight")[ids].float().unsqueeze(0)
        return h * torch.tensor(self.config.hidden_size ** 0.5) if self.desc.embed_scale else h

    def layer(self, i: int, effective: dict | None = None) -> torch.nn.Module:
        """Decoder layer i. `effective`: MatMul name (as the ONNX graph names it; fused q/k/v and gate/up
        included) -> loader of W [N, K] to use instead of the checkpoint's weight (e.g. dequantized INT4)."""
        prefix = self.desc.layer_prefix(i)
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        state = {k[len(prefix):]: self.ck.get_torch(k) for k in self.ck.weight_map if k.startswith(prefix)}
        layer.load_state_dict(state, assign=True, strict=True)
        for mod in layer.modules():
            if type(mod) is torch.nn.Linear:
                mod.__class__ = Fp32Linear  # not a bound-method attribute: that cycle would keep layers alive
            else:
                for name, p in list(mod.named_parameters(recurse=False)):
                    setattr(mod, name, torch.nn.Parameter(p.detach().float(), requires_grad=False))
        for name, eff in (effective or {}).items():
            if name.startswith(prefix):
                self.put_weight(layer, name[len(prefix):], eff.load(), eff.act_int8_block)
        return layer.requires_grad_(False).eval()

    def put_weight(self, layer, module: str, w, act_int8_block: int | None = None) -> None:
        """W [N, K] (as the graph computes it) into the layer's linear `module`, or over the linears a fused name
        stands for."""
        _set_weights(layer, self.desc.fused.get(module, (module,)), torch.from_numpy(np.array(w, np.float32)),
                     act_int8_block)

    def run_layer(self, index: int, layer, h: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """Decoder layer `index` on hidden states at `positions`; a cache (from `new_cache`) holds every earlier
        position. A sliding-window layer gets its window as an explicit mask (the eager model builds the same)."""
        rope = self.rotary(h, positions) if self.rope_types is None else self.rotary(h, positions, self.rope_types[index])
        out = layer(h, attention_mask=self._mask(self.windows[index], positions), position_ids=positions,
                    **{cache_keyword(type(layer).forward): cache}, use_cache=cache is not None,
                    position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    def _mask(self, window: int | None, positions: torch.Tensor) -> torch.Tensor | None:
        """[1, 1, S, T] for queries at `positions` over keys 0 .. T-1: boolean (True: attend) for SDPA, or None for
        plain causal; additive (0 / min float) for eager attention, which applies no causal mask of its own."""
        if window is None and not self.eager:
            return None
        q = positions[0].unsqueeze(1)
        k = torch.arange(int(positions[0, -1]) + 1).unsqueeze(0)
        keep = (k <= q) & (q - k < window) if window is not None else k <= q
        if self.eager:
            return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]
        return keep[None, None]

    def new_cache(self):
        """A KV cache that keeps every position of every layer (a sliding-window cache would drop the keys the
        explicit masks of `run_layer` index)."""
        return dynamic_cache(None)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        with torch.device("meta"):
            norm = self.norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.load_state_dict({"weight": self.ck.get_torch(self.desc.final_norm + ".weight").float()}, assign=True)
        return norm(h)

    @property
    def head_name(self) -> str:
        head = self.desc.lm_head + ".weight"
        return head if head in self.ck else self.desc.embed + ".weight"

    def head(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Logits for normed hidden states x [S, hidden], the head read in row chunks."""
        vocab = self.ck.shapes[self.head_name][0]
        logits = torch.cat([x @ self.ck.get_torch(self.head_name, (r, min(r + chunk, vocab))).float().T
                            for r in range(0, vocab, chunk)], dim=-1)
        if self.final_softcap:  # Gemma 2
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


@dataclass
class EffectiveWeight:
    """A weight as a rewritten graph computes it: `load()` gives W [N, K]; `act_int8_block` says the kernel rounds
    its input to int8 per block of that many channels (MatMulNBits accuracy_level 4), None: fp32 input."""

    load: Callable[[], np.ndarray]
    act_int8_block: int | None = None


def _set_weights(layer, names: tuple[str, ...], w: torch.Tensor, act_int8_block: int | None = None) -> None:
    """Put W [N, K] into the layer's linear, or split its rows over the linears a fused weight stands for."""
    mods = [layer.get_submodule(n) for n in names]
    sizes = [m.out_features for m in mods]
    if sum(sizes) != w.shape[0] or any(m.in_features != w.shape[1] for m in mods):
        raise ValueError(f"weight for {'+'.join(names)}: {list(w.shape)} does not fit their {sizes} rows x "
                         f"{mods[0].in_features} columns")
    for m, part in zip(mods, torch.split(w, sizes)):
        m.weight = torch.nn.Parameter(part.contiguous(), requires_grad=False)
        if act_int8_block:
            m.__class__ = Int8ActLinear
            m.act_block = act_int8_block


Reduce = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


class LayerStep:
    """One stop of `walk`: decoder layer `index` (or the head, `index == num_layers`: the final norm's output,
    the input of lm_head). `observe` runs the calibration windows through it, returning reduced input statistics
    of the chosen modules; the walk goes on with that run's outputs."""

    HEAD = "lm_head"

    def __init__(self, layers: CheckpointLayers, index: int, hidden: list[torch.Tensor], effective: dict | None = None):
        self.layers = layers
        self.index = index
        self.is_head = index == layers.num_layers
        self.module = None if self.is_head else layers.layer(index, effective)
        self.hidden = hidden
        self.outputs: list[torch.Tensor] | None = None

    def observe(self, modules: dict[str, torch.nn.Module | None], reduce: Reduce) -> dict[str, torch.Tensor]:
        """`modules`: name -> a submodule of this layer whose input is measured (the head step takes
        {name: None}: its input is the final norm's output)."""
        stats: dict[str, torch.Tensor] = {}

        def take(name, x):
            stats[name] = reduce(stats.get(name), x.detach().reshape(-1, x.shape[-1]).float())

        if self.is_head:
            with torch.inference_mode():
                for h in self.hidden:
                    x = self.layers.final_norm(h)
                    for name in modules:
                        take(name, x)
            return stats
        hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: take(name, args[0]))
                 for name, m in modules.items()]
        try:
            self._forward()
        finally:
            for h in hooks:
                h.remove()
        return stats

    @torch.inference_mode()
    def _forward(self) -> None:
        self.outputs = [self.layers.run_layer(self.index, self.module, h, torch.arange(h.shape[1]).unsqueeze(0))
                        for h in self.hidden]


def walk(checkpoint, windows, *, last_layer: int | None = None, head: bool = False, effective: dict | None = None,
         desc: str = "calibration (layer by layer)") -> Iterator[LayerStep]:
    """Yield a LayerStep for decoder layers 0 .. `last_layer` (default: all), then the head step if `head`.
    Each calibration window keeps its own [1, S, hidden] fp32 activations; one layer's weights are in memory.
    `effective` replaces weights (see CheckpointLayers.layer), so the walk runs the model as quantized so far."""
    layers = CheckpointLayers(checkpoint)
    last = layers.num_layers - 1 if last_layer is None or head else last_layer
    with torch.inference_mode():
        hidden = [layers.embed(torch.as_tensor(w, dtype=torch.long)) for w in windows]
    for i in track(range(last + 1 + int(head)), desc=desc, unit="layer"):
        step = LayerStep(layers, i, hidden, effective)
        yield step
        if not step.is_head:
            if step.outputs is None:
                step._forward()
            hidden = step.outputs
        step.module = step.hidden = step.outputs = None  # the caller may still hold the step: free the layer now


def channel_absmax(prev: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    m = x.abs().amax(0)
    return m if prev is None else torch.maximum(prev, m)
