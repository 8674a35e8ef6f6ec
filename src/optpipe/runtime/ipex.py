"""Running a cpu-ipex artifact: the HF checkpoint with `ipex.llm.optimize` applied as `ipex.json` says.

IPEX is archived upstream (2.8.0, torch 2.8.* exactly) and lives in its own environment (scripts/check_ipex.sh)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError, InputError, RecipeError
from .generation import Generation
from .torch_modules import dtype_keyword

SETTINGS_FILE = "ipex.json"
INSTALL_HINT = ("IPEX is an optional backend: it needs torch 2.8.* exactly, which conflicts with optpipe's torch "
                "pin, so it lives in its own environment. Run scripts/check_ipex.sh (creates .venv-ipex with torch "
                "2.8.0, intel-extension-for-pytorch 2.8.0, transformers 4.51.3) and use .venv-ipex/bin/optpipe")


def import_ipex():
    try:
        import intel_extension_for_pytorch as ipex
    except ImportError as e:
        raise RecipeError(f"target cpu-ipex: intel-extension-for-pytorch is not importable ({e}). {INSTALL_HINT}") from None
    except Exception as e:  # noqa: BLE001 - IPEX raises at import on a torch version mismatch
        raise RecipeError(f"target cpu-ipex: intel-extension-for-pytorch fails to import: {e}. {INSTALL_HINT}") from None
    return ipex


class IpexRunner:
    """HF generate on the IPEX-optimized model; the first streamed token marks the end of the prefill."""

    def __init__(self, model, threads: int):
        self.model = model
        self.threads = threads

    def with_threads(self, threads: int):
        """This runner at another thread count (torch reads the count at each call)."""
        self.threads = threads
        return self

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode(), torch.autocast("cpu", enabled=self.model.dtype == torch.bfloat16):
            out = self.model(torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1), use_cache=False)
        return out.logits[0].float().numpy()

    def precisions(self) -> dict[str, str]:
        """IPEX replaces Linear modules by its own fused ones; what `ipex.json` asked for is what they run."""
        return {}

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 31)

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None,
                 pick=None, on_token=None) -> Generation:
        from transformers.generation.streamers import BaseStreamer

        if pick is not None:
            raise InputError("cpu-ipex artifacts decode greedily (IPEX's generate path); sampling is not supported")
        marks: list[float] = []

        class _Clock(BaseStreamer):
            def put(self, value):
                marks.append(time.perf_counter())
                if on_token is not None and len(marks) > 1:  # marks[0] is the prompt
                    on_token(int(value.reshape(-1)[0]))

            def end(self):
                pass

        torch.set_num_threads(self.threads)
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
        with torch.inference_mode(), torch.autocast("cpu", enabled=self.model.dtype == torch.bfloat16):
            t0 = time.perf_counter()
            out = self.model.generate(ids_t, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      eos_token_id=eos_token_id, pad_token_id=eos_token_id or 0, streamer=_Clock())
            t_end = time.perf_counter()
        tokens = [int(t) for t in out[0, ids_t.shape[1]:]]
        t1 = marks[1] if len(marks) > 1 else t_end  # marks[0]: the prompt, marks[1]: the first new token
        return Generation(tokens, t1 - t0, t_end - t1)


def load_ipex_artifact(directory: Path, threads: int) -> IpexRunner:
    from transformers import AutoModelForCausalLM

    ipex = import_ipex()
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: {SETTINGS_FILE} is missing (not a cpu-ipex artifact?)")
    s = json.loads(path.read_text(encoding="utf-8"))
    dtype = getattr(torch, s["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(directory), **{dtype_keyword(): dtype}, local_files_only=True).eval()
    if not getattr(model.config, "architectures", None):  # ipex.llm.optimize indexes it
        model.config.architectures = [type(model).__name__]
    qconfig = None
    if s["weight_only"] != "none":
        from intel_extension_for_pytorch.quantization import (
            WoqLowpMode,
            WoqWeightDtype,
            get_weight_only_quant_qconfig_mapping,
        )

        qconfig = get_weight_only_quant_qconfig_mapping(
            weight_dtype=getattr(WoqWeightDtype, s["weight_only"].upper()),
            lowp_mode=getattr(WoqLowpMode, s["lowp_mode"].upper()), group_size=s.get("block_size", s.get("group_size")))
    torch.set_num_threads(threads)
    model = ipex.llm.optimize(model, dtype=dtype, inplace=True, quantization_config=qconfig,
                              deployment_mode=s["deployment_mode"])
    return IpexRunner(model, threads)
