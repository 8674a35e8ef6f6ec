"""`cpu-ipex`: an optional backend for users who already run Intel Extension for PyTorch in production.

IPEX is archived upstream (last release 2.8.0, needs torch 2.8.* exactly) and is not a dependency of optpipe:
`scripts/check_ipex.sh` builds its own environment. The artifact is the HF checkpoint (safetensors, fp32 or
bf16) + `ipex.json`; loading applies `ipex.llm.optimize` with those settings and runs HF `generate` on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import hw
from ..errors import RecipeError
from ..runtime.ipex import SETTINGS_FILE, import_ipex, load_ipex_artifact
from .base import TargetBase


def fast_woq_kernels() -> tuple[bool, str]:
    """IPEX builds its fast weight-only kernels only for CPUs with AVX512-FP16 or AMX."""
    isa = hw.isa()
    have = [k for k in ("avx512_fp16", "amx_tile", "amx_int8", "amx_bf16") if isa.get(k)]
    return bool(have), ", ".join(have) if have else "neither AVX512-FP16 nor AMX"


class CpuIpexTarget(TargetBase):
    name = "cpu-ipex"
    final_stage = "torch"

    def preflight(self) -> None:
        """Before the model is loaded: stop at once when IPEX is missing."""
        import_ipex()

    def save(self, state, directory: Path) -> dict:
        settings = state.handoff.ipex
        if settings is None:
            raise RecipeError("target cpu-ipex: the recipe needs an `ipex-optimize` pass (it sets what IPEX applies)")
        directory.mkdir(parents=True, exist_ok=True)
        model = state.torch_model
        dtype = str(model.dtype).removeprefix("torch.")
        model.save_pretrained(str(directory), safe_serialization=True)
        if state.tokenizer is not None:
            state.tokenizer.save_pretrained(str(directory))
        full = {**settings, "dtype": dtype, "torch_version": torch.__version__}
        (directory / SETTINGS_FILE).write_text(json.dumps(full, indent=1), encoding="utf-8")
        fast, why = fast_woq_kernels()
        return {"format": "hf-safetensors + ipex.json (ipex.llm.optimize applied at load)", "settings_file": SETTINGS_FILE,
                "tokenizer_dir": "." if state.tokenizer is not None else None,  # beside the checkpoint, as HF keeps it
                "runtime": f"intel-extension-for-pytorch {settings['ipex_version']}", "dtype": dtype, "ipex": full,
                "fast_woq_kernels": fast, "fast_woq_kernels_reason": why}

    def speed_failure_hint(self, saved: dict | None) -> str | None:
        ipex = (saved or {}).get("ipex", {})
        fast, have = fast_woq_kernels()
        if ipex.get("weight_only", "none") != "none" and not fast:
            return ("likely cause: IPEX's fast weight-only kernels need AVX512-FP16 or AMX; this CPU has "
                    f"{have} (detected at run time: {hw.cpu_model()}), so IPEX dequantizes the weights on every call")
        return None

    def load(self, directory: Path, threads: int):
        return load_ipex_artifact(Path(directory), threads)
