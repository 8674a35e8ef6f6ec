"""`static-kv-cache` (cpu-torch): decode with transformers' StaticCache, preallocated to `max_length`.

The cache tensors are allocated once per generation and written in place, so decode steps neither grow
nor copy the cache; fixed shapes also let torch.compile (`compile: true`) specialise the decode step."""
from __future__ import annotations

from pydantic import Field

from ..handoff import KVCacheLayout
from ..pipeline import ModelState, PassConfig, PassContext, PassResult, TorchPass, check_cache_length


class TorchStaticKVConfig(PassConfig):
    max_length: int = Field(2048, ge=16, description="prompt + generated tokens the cache holds")
    compile: bool = Field(False, description="torch.compile (Inductor) the forward when the artifact is loaded; "
                                            "costs a compile of a minute or more on load")


class TorchStaticKVCache(TorchPass):
    name = "static-kv-cache"
    Config = TorchStaticKVConfig
    provides = frozenset({"static-kv-cache"})
    targets = frozenset({"cpu-torch"})
    once = True

    def check_recipe(self, recipe, facts, earlier) -> None:
        check_cache_length(self.config.max_length, recipe, facts.max_positions if facts else None,
                           "the model's max_position_embeddings")

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        limit = getattr(state.torch_model.config, "max_position_embeddings", None)
        n = self.config.max_length
        notes = []
        if limit and n > limit:
            notes.append(f"max_length {n} is beyond the model's max_position_embeddings {limit}")
        state.handoff.kv_cache = KVCacheLayout("static", n)
        state.handoff.compile = self.config.compile
        return PassResult(True, {"max_length": n, "compile": self.config.compile}, notes)
