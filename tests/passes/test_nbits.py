"""The MatMulNBits storage format (`passes/_nbits`): a float-zero-point weight runs as one MatMulNBits whose extra
K blocks carry the remainder's digits, and stays on its grid."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optpipe.passes._nbits import quantize_matmuls
from optpipe.pipeline import ModelState, PassContext
from optpipe.quant import REMAINDER_DIGITS, remainder_blocks
from optpipe.runtime.ort_decoder import session_options


def one_linear(w_kn: np.ndarray, x_shape: list | None = None) -> onnx.ModelProto:
    """x @ W; x's shape as declared (None: no shape, so its rank is unknown to the pass)."""
    k, n = w_kn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "lin.weight"], ["y"], name="lin")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", k] if x_shape is None else x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w_kn, "lin.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def grid_weight(rng, n: int, k: int, block: int, bits: int) -> np.ndarray:
    """W [N, K] exactly d*q + m per block of `block` along K, d and m float16 values (GGUF Q4_1's kind of grid)."""
    nb = k // block
    d = rng.uniform(0.002, 0.05, (n, nb)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(0, (1 << bits) - 1, (n, nb))).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 1 << bits, (n, nb, block)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, (1 << bits) - 1  # full range used, as a min/max quantizer leaves it
    return (q * d[..., None] + m[..., None]).reshape(n, k)


@pytest.mark.parametrize("bits,block,k", [(4, 32, 576), (4, 32, 96), (4, 16, 48), (8, 32, 1536), (4, 64, 4096)])
def test_float_zero_point_runs_as_one_kernel_on_its_grid(bits, block, k):
    """Odd block counts (zero points padded to whole bytes), more blocks than one digit block holds, 8 bits: the
    output stays within the two digits' bound of x @ W, over 100x closer than integer zero points (which drop the
    remainder), and each linear is one MatMulNBits reading x and its block sums."""
    rng = np.random.default_rng(k + bits)
    n = 40
    w = grid_weight(rng, n, k, block, bits)
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    want = x @ w.T
    got = {}
    for scheme in ("float", "int"):
        state = ModelState("onnx", onnx_model=one_linear(np.ascontiguousarray(w.T)))
        quantize_matmuls(state, PassContext(), bits=bits, block=block, scheme=scheme, algorithm="rtn",
                         accuracy_level=0, include=[], exclude=[])
        got[scheme] = run(state.onnx_model, x)
        kernels = [nd for nd in state.onnx_model.graph.node if nd.op_type == "MatMulNBits"]
        assert len(kernels) == 1
    attrs = {a.name: a.i for a in kernels[0].attribute}
    assert attrs["K"] == k  # the int scheme reads the weight alone
    err_float = np.abs(got["float"] - want).max()
    err_int = np.abs(got["int"] - want).max()
    # each digit leaves at most half its step: after two, |R' - stored| <= max|R'| / (2 * levels^2), |R'| <= d/2
    levels = (1 << (bits - 1)) - 1
    sums = np.abs(x.reshape(1, 5, k // block, block).sum(-1)).sum(-1).max()
    bound = sums * 0.05 / 2 / (2 * levels ** REMAINDER_DIGITS) + 1e-3 * np.abs(want).max()
    assert err_float <= bound, (err_float, bound)
    assert err_float < err_int / 100, (err_float, err_int)


def test_float_zero_point_is_stored_in_integer_form_with_digit_blocks():
    rng = np.random.default_rng(0)
    w = grid_weight(rng, 8, 576, 32, 4)
    state = ModelState("onnx", onnx_model=one_linear(np.ascontiguousarray(w.T)))
    quantize_matmuls(state, PassContext(), bits=4, block=32, scheme="float", algorithm="rtn", accuracy_level=4,
                     include=[], exclude=[])
    kernel = next(nd for nd in state.onnx_model.graph.node if nd.op_type == "MatMulNBits")
    assert {a.name: a.i for a in kernel.attribute}["K"] == 576 + remainder_blocks(18, 32) * 32 == 640
    stored = {t.name: t for t in state.onnx_model.graph.initializer if t.name.startswith("lin.")}
    assert set(stored) == {"lin.qweight", "lin.scales", "lin.zero_points"}  # the integer form: nothing else
    assert stored["lin.qweight"].dims == [8, 20, 16] and stored["lin.scales"].data_type == TensorProto.FLOAT16


@pytest.mark.parametrize("rank", [2, 3, 4, None])
def test_block_sums_read_nothing_but_x_whatever_its_rank(rank):
    """The kernel's extra input is x's block sums by Reshape + ReduceSum (+ Pad to whole digit blocks): no 0/1
    matrix to read each step. Declared ranks get a constant view; an unknown rank (no shape on x) a view built
    from x's shape. Either way the output matches the weights the digits encode."""
    rng = np.random.default_rng(7)
    k, n = 576, 24
    w = grid_weight(rng, n, k, 32, 4)
    x = rng.standard_normal((2, 3, 4, k)[4 - (rank or 3):]).astype(np.float32)
    declared = None if rank is None else [f"d{i}" for i in range(rank - 1)] + [k]
    model = one_linear(np.ascontiguousarray(w.T), declared)
    if rank is None:
        model.graph.input[0].type.tensor_type.ClearField("shape")
    state = ModelState("onnx", onnx_model=model)
    quantize_matmuls(state, PassContext(), bits=4, block=32, scheme="float", algorithm="rtn", accuracy_level=0,
                     include=[], exclude=[])
    g = state.onnx_model.graph
    assert max(int(np.prod(t.dims)) for t in g.initializer if not t.name.startswith("lin.")) <= 2 * 4
    assert [nd.op_type for nd in g.node if nd.op_type not in ("Cast",)] == (
        (["Shape", "Concat"] if rank is None else []) + ["Reshape", "ReduceSum", "Pad", "Concat", "MatMulNBits"])
    got = run(state.onnx_model, x)
    assert got.shape == x.shape[:-1] + (n,)
    assert np.abs(got - x @ w.T).max() <= 1e-3 * np.abs(x @ w.T).max()
