"""The runtime needs nothing from the compiler: importing it pulls in no pass, target or builder module, and an
artifact loads and generates with those modules made unimportable."""
import subprocess
import sys

import pytest

import optpipe

from ..conftest import FUSED_INT4, tiny_recipe

COMPILER = ("optpipe.passes", "optpipe.targets", "optpipe.builder", "optpipe.pipeline", "optpipe.recipe",
            "optpipe.gates", "optpipe.preflight", "optpipe.models", "optpipe.layerwise")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_the_runtime_imports_no_compiler_module():
    out = _run("import sys, optpipe.runtime; print(sorted(m for m in sys.modules if m.startswith('optpipe')))")
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)  # noqa: S307 - our own subprocess's printed list
    assert not [m for m in loaded if m.startswith(COMPILER)], loaded


BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith({compiler!r}):
            raise ImportError("compiler module " + name + " is absent")
sys.meta_path.insert(0, Block())
import numpy as np, optpipe
m = optpipe.load({path!r}, threads=1)
print(m.generate(np.arange(5, 15), 4, eos_token_id=None).tokens)
"""


@pytest.mark.parametrize("target", ["cpu-onnx", "cpu-torch"])
def test_load_works_with_the_compiler_absent(tiny_llama, tmp_path, target):
    passes = FUSED_INT4 if target == "cpu-onnx" else [{"name": "quantize-int4", "block_size": 32}]
    recipe = tiny_recipe(tiny_llama, passes) | {"target": target}
    out = tmp_path / "art"
    optpipe.build(recipe, output=out, log=lambda m: None)
    expected = optpipe.load(out, threads=1).generate(list(range(5, 15)), 4, eos_token_id=None).tokens
    res = _run(BLOCK.format(compiler=COMPILER, path=str(out)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert eval(res.stdout.strip().splitlines()[-1]) == expected  # noqa: S307
