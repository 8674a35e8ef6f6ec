"""Lazy initializers: the streaming build's way to keep a 13B graph's weights out of memory.

A lazy initializer is an ordinary TensorProto (name, dims, data type) whose data is marked external at a
placeholder location; a loader registered under that location produces the array when the artifact is
written. Passes compose loaders instead of arrays (read a weight from the checkpoint -> transpose ->
concatenate q/k/v -> quantize), so nothing is computed before the writer asks for one tensor, writes it to
the external-data file and drops it. Peak memory is one layer's weights, not the model.
"""
from __future__ import annotations

import uuid
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

PREFIX = "optpipe-lazy:"
_LOADERS: dict[str, Callable[[], np.ndarray]] = {}


def tensor(name: str, shape: tuple[int, ...], dtype, loader: Callable[[], np.ndarray]) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name = name
    t.dims.extend(int(d) for d in shape)
    t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    t.data_location = onnx.TensorProto.EXTERNAL
    key = PREFIX + uuid.uuid4().hex
    t.external_data.add(key="location", value=key)
    _LOADERS[key] = loader
    return t


def _key(t: onnx.TensorProto) -> str | None:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    loc = next((e.value for e in t.external_data if e.key == "location"), "")
    return loc if loc.startswith(PREFIX) else None


def is_lazy(t: onnx.TensorProto) -> bool:
    return _key(t) is not None


def any_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in model.graph.initializer)


def array(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's data: computed by its loader when lazy, decoded from the proto otherwise."""
    return _reader(t)()


def _reader(t: onnx.TensorProto) -> Callable[[], np.ndarray]:
    """A function giving t's data, bound to its loader now (so it still works after the writer released t)."""
    key = _key(t)
    if key is None:
        return lambda: numpy_helper.to_array(t)
    loader = _LOADERS[key]
    return lambda: _checked(t, loader())


def _checked(t: onnx.TensorProto, arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    want = helper.tensor_dtype_to_np_dtype(t.data_type)
    if tuple(arr.shape) != tuple(t.dims) or arr.dtype != want:
        raise ValueError(f"lazy tensor {t.name}: loader gave {arr.dtype}{list(arr.shape)}, "
                         f"declared {np.dtype(want)}{list(t.dims)}")
    return arr


def release(t: onnx.TensorProto) -> None:
    key = _key(t)
    if key is not None:
        _LOADERS.pop(key, None)


def derived(name: str, shape, dtype, fn: Callable[..., np.ndarray], *sources: onnx.TensorProto) -> onnx.TensorProto:
    """A lazy tensor computed from other tensors (lazy or not) when it is written, even after they were."""
    readers = [_reader(s) for s in sources]
    return tensor(name, tuple(shape), dtype, lambda: fn(*(r() for r in readers)))


class Shared:
    """One computation feeding several lazy tensors (e.g. qweight, scales, zero points of one weight):
    computed when the first is written, dropped once all have been (a later reader, e.g. a tensor derived from one
    of them, computes it again)."""

    def __init__(self, compute: Callable[[], dict[str, np.ndarray]], parts: int):
        self.compute = compute
        self.left = parts
        self.value: dict[str, np.ndarray] | None = None

    def part(self, key: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            if self.value is None:
                self.value = self.compute()
            out = self.value[key]
            self.left -= 1
            if self.left <= 0:
                self.value = None
            return out
        return load


class Spill:
    """Tensors that must be computed before the artifact is written (GPTQ: one calibration run a layer, in layer
    order) parked in a scratch directory, one safetensors file per group, and read back when the writer asks."""

    def __init__(self, directory):
        from pathlib import Path

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, object] = {}

    def put(self, group: str, arrays: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        path = self.directory / f"{len(self.files):05d}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
        self.files[group] = path

    def get(self, group: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.files[group]))


def save_streaming(model: onnx.ModelProto, model_path, data_file: str, inline_below: int = 1024) -> int:
    """Write `model` with every initializer of `inline_below` bytes or more in one external-data file, computing
    lazy tensors one at a time (each is released once written). Offsets of tensors of 1 MiB or more are
    page-aligned so ONNX Runtime can map them. Returns the bytes written."""
    from pathlib import Path

    from .progress import bar

    model_path = Path(model_path)
    data_path = model_path.parent / data_file

    def nbytes(t):
        n = int(np.prod(t.dims)) if t.dims else 1
        return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize

    big = [t for t in model.graph.initializer if is_lazy(t) or nbytes(t) >= inline_below]
    offset = 0
    with open(data_path, "wb") as f, bar(sum(nbytes(t) for t in big), "writing weights", "B",
                                          unit_scale=True) as b:
        for t in big:
            arr = array(t)
            release(t)
            data = arr.tobytes()
            del arr
            if len(data) >= 1 << 20 and offset % 4096:
                f.write(b"\0" * (-offset % 4096))
                offset += -offset % 4096
            f.write(data)
            for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(fld)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_file), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=k, value=v)
            offset += len(data)
            b.update(len(data))
            del data
    onnx.save_model(model, str(model_path))
    return offset
