"""`cpu-onnx`: an ONNX Runtime CPU artifact (model.onnx + one external-data file + tokenizer + genai_config.json).

Running it is `optpipe.runtime.ort_decoder.OnnxDecoder` (IOBinding decode loop, shared static KV buffer), or
onnxruntime-genai's own loop on the same directory (`onnxruntime_genai.Model(path)`)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from .. import lazy as _lazy
from ..runtime.ort_decoder import OnnxDecoder
from .base import TargetBase
from .genai import CONFIG_FILE, genai_config

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_DIR = "."  # beside model.onnx, where onnxruntime-genai looks for it


class CpuOnnxTarget(TargetBase):
    name = "cpu-onnx"
    final_stage = "onnx"

    def save(self, state, directory: Path) -> dict:
        directory.mkdir(parents=True, exist_ok=True)
        # Saving moves the weights out of the in-memory proto: the state is consumed (saving is the last step).
        streamed = _lazy.any_lazy(state.onnx_model)
        meta = {p.key: p.value for p in state.onnx_model.metadata_props}
        genai = genai_config(meta, MODEL_FILE, state.tokenizer)
        if streamed:  # streaming build: weights are read, quantized and written one tensor at a time
            _lazy.save_streaming(state.onnx_model, directory / MODEL_FILE, DATA_FILE)
        else:
            onnx.save_model(state.onnx_model, str(directory / MODEL_FILE), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        if state.tokenizer is not None:
            state.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        (directory / CONFIG_FILE).write_text(json.dumps(genai, indent=1), encoding="utf-8")
        return {"format": "onnx", "model_file": MODEL_FILE, "external_data": DATA_FILE, "genai_config": CONFIG_FILE,
                "tokenizer_dir": TOKENIZER_DIR if state.tokenizer is not None else None,
                "runtime": "onnxruntime CPUExecutionProvider", "kv_cache": state.handoff.kv_cache.as_dict(),
                "quantized": state.handoff.quantized_summary(),
                "streamed": streamed}

    def load(self, directory: Path, threads: int) -> OnnxDecoder:
        return OnnxDecoder.from_path(Path(directory) / MODEL_FILE, threads=threads)
