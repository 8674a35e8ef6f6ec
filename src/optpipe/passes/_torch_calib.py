"""Calibration on the PyTorch model: run calibration text and capture the inputs of chosen modules; the base of
the passes that rescale from such statistics."""
from __future__ import annotations

from typing import Callable

import torch

from ..pipeline import TorchPass
from ..progress import track


class CalibratedRescaling(TorchPass):
    """A pass that moves scale between a projection's source and its weights from calibration statistics (awq,
    smoothquant): it works on the separate q/k/v and gate/up linears, so it runs before `fuse` packs them."""
    topology = True
    needs = frozenset({"calibration"})

    def check_recipe(self, recipe, facts, earlier) -> None:
        if any("fused-projections" in p.provides for p in earlier):
            raise ValueError("must come before `fuse`: it rescales the separate q/k/v and gate/up linears that "
                             "fuse packs into one")


def capture_inputs(model, modules: dict[str, torch.nn.Module], windows, reduce: Callable | None = None,
                   max_tokens: int | None = None, desc: str = "calibration") -> dict[str, torch.Tensor]:
    """Inputs of each module as float32 rows [tokens, features]. With `reduce(previous, rows)` only a running
    summary is kept (e.g. a per-channel max) instead of every row."""
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def make_hook(name):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if reduce is None:
                rows[name].append(x)
            else:
                out[name] = reduce(out.get(name), x)
        return hook

    hooks = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    budget = max_tokens
    try:
        with torch.inference_mode():
            for ids in track(windows, desc=desc, unit="window"):
                if budget is not None:
                    if budget <= 0:
                        break
                    ids = ids[:budget]
                    budget -= ids.size
                model(torch.as_tensor(ids).reshape(1, -1), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if reduce is None:
        out = {name: torch.cat(r) for name, r in rows.items()}
    return out
