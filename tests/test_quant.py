import numpy as np
import pytest

from optpipe import quant as _quant


def grid_weights(n=16, k=64, block=32, seed=0, half=False):
    """Weights exactly on a Q4_1-style grid: d*q + m per block of 32 along K (`half`: d and m float16 values, as a
    GGUF file stores them)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.01, 0.05, (n, k // block, 1)).astype(np.float16 if half else np.float64).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, (n, k // block, 1)).astype(np.float16 if half else np.float64).astype(np.float32)
    q = rng.integers(0, 16, (n, k // block, block))
    q[..., 0], q[..., 1] = 0, 15  # full range used, as a min/max quantizer leaves it
    return (d * q + m).reshape(n, k).astype(np.float32)


def unpack(b, bits, count):
    per = 8 // bits
    vals = [(b >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return np.stack(vals, -1).reshape(*b.shape[:-1], -1)[..., :count]


def test_float_zero_point_is_exact_on_q4_1_grid():
    w = grid_weights()
    qw = _quant.rtn(w, 4, 32, "float")
    assert np.abs(qw.dequantize() - w).max() < 1e-6
    # the float minimum is what makes it exact: an integer zero point alone cannot represent it
    assert qw.minimum is not None and (qw.minimum < -0.05).all()
    int_zp = _quant.rtn(w, 4, 32, "int")
    assert np.abs(int_zp.dequantize() - w).max() > 1e-3


def test_float16_storage_is_exact_on_a_gguf_grid():
    """GGUF stores d and m in float16: with float16 storage the grid is still reproduced exactly, and what the
    quantizer returns is what will be stored (float16 values)."""
    w = grid_weights(half=True)
    for fit in (lambda: _quant.rtn(w, 4, 32, "float", scale_dtype=np.float16),
                lambda: _quant.gptq(w, np.eye(64), 4, 32, "float", scale_dtype=np.float16)):
        qw = fit()
        assert np.abs(qw.dequantize() - w).max() == 0.0
        for p in (qw.scale, qw.minimum):
            assert np.array_equal(p.astype(np.float16).astype(np.float32), p)


@pytest.mark.parametrize("scheme", ["float", "int", "symmetric"])
def test_float16_storage_costs_little_off_the_grid(scheme):
    """Codes are fitted against the rounded scales, so float16 storage adds almost nothing to the 4-bit error."""
    w = np.random.default_rng(4).normal(size=(64, 256)).astype(np.float32)
    e32 = _quant.relative_error(_quant.rtn(w, 4, 32, scheme).dequantize(), w)
    e16 = _quant.relative_error(_quant.rtn(w, 4, 32, scheme, scale_dtype=np.float16).dequantize(), w)
    assert abs(e16 - e32) < 0.002 * e32, (e16, e32)


def test_stored_float16_keeps_tiny_scales_nonzero_and_refuses_overflow():
    s = _quant.stored(np.array([1e-9, -1e-9, 1.0]), np.float16)
    assert s[0] > 0 and s[1] < 0 and s[2] == 1.0  # codes divide by a scale
    assert _quant.stored(np.array([1e-9]), np.float16, "minimum")[0] == 0.0  # a minimum may round to 0
    with pytest.raises(ValueError, match="scale_dtype: float32"):
        _quant.stored(np.array([1e6]), np.float16)
    assert np.array_equal(_quant.stored(np.array([0.1]), np.float32), np.float32([0.1]))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 96)).astype(np.float32)
    qw = _quant.rtn(w, bits, 32, "int")
    b, scales, zp = _quant.pack_matmulnbits(qw, bits)
    assert b.shape == (8, 3, 32 * bits // 8) and scales.shape == (24,)
    assert np.array_equal(unpack(b, bits, 32), qw.q)
    zp_rows = zp.reshape(8, -1)
    assert np.array_equal(unpack(zp_rows[:, None, :], bits, 3)[:, 0], qw.zero)


def test_symmetric_q8_exact_for_q8_0_grid():
    rng = np.random.default_rng(2)
    d = rng.uniform(0.001, 0.01, (4, 2, 1))
    q = rng.integers(-127, 128, (4, 2, 32))
    q[..., 0] = 127
    w = (d * q).reshape(4, 64).astype(np.float32)
    assert np.abs(_quant.rtn(w, 8, 32, "symmetric").dequantize() - w).max() < 1e-6


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(3)
    k, n = 128, 32
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(2048, k)) @ mix + rng.normal(size=(1, k)) * 2
    w = rng.normal(size=(n, k)).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    for scheme in ("int", "float", "symmetric"):
        err_rtn = np.linalg.norm(x @ (_quant.rtn(w, 4, 32, scheme).dequantize() - w).T)
        err_gptq = np.linalg.norm(x @ (_quant.gptq(w, h, 4, 32, scheme).dequantize() - w).T)
        assert err_gptq < 0.9 * err_rtn, scheme


def test_act_order_helps_when_a_few_input_channels_dominate():
    """Off-grid checkpoints: a few correlated input channels carry most of the activation energy. Quantizing those
    columns first (act-order, static groups) leaves the error where the remaining columns can still absorb it
    (ratio 0.73-0.84 over seeds 0-4)."""
    rng = np.random.default_rng(0)
    k, n = 128, 48
    mix = np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k)
    x = (rng.normal(size=(4096, k)) @ mix) * np.exp(rng.normal(size=k) * 1.2)  # log-normal channel magnitudes
    w = rng.normal(size=(n, k)).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    err = {order: np.linalg.norm(x @ (_quant.gptq(w, h, 4, 32, "float", act_order=order).dequantize() - w).T)
           for order in (False, True)}
    assert err[True] < 0.9 * err[False], err


@pytest.mark.parametrize("scheme,bound", [("float", 0.95), ("int", 0.98)])  # measured 0.93 / 0.965
def test_clip_search_never_loses_to_the_full_range_and_keeps_grids_exact(scheme, bound):
    """Heavy-tailed weights (Student t, as real checkpoints have): shrinking a block's range trades the few
    clipped outliers for a finer step everywhere else, and the search keeps the full range wherever that is
    better, so no block's squared error grows; weights on a Q4_1 grid keep their exact full range."""
    rng = np.random.default_rng(5)
    w = (rng.standard_t(3, size=(64, 256)) * 0.02).astype(np.float32)
    sq = lambda qw: ((qw.dequantize() - w) ** 2).reshape(64, 8, 32).sum(-1)  # noqa: E731
    plain, clipped = sq(_quant.rtn(w, 4, 32, scheme)), sq(_quant.rtn(w, 4, 32, scheme, clip=True))
    assert (clipped <= plain + 1e-12).all() and clipped.sum() < bound * plain.sum()
    grid = grid_weights()
    assert np.abs(_quant.rtn(grid, 4, 32, "float", clip=True).dequantize() - grid).max() < 1e-6


def test_clipped_gptq_weighs_the_range_by_the_hessian_diagonal():
    """With a few input channels carrying most of the activation energy, the clip search under GPTQ keeps those
    channels' weights unclipped: the output error falls where an unweighted search would not help as much."""
    rng = np.random.default_rng(0)
    k, n = 128, 48
    x = rng.normal(size=(4096, k)) * np.exp(rng.normal(size=k) * 1.2)
    w = (rng.standard_t(3, size=(n, k)) * 0.02).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    err = {c: np.linalg.norm(x @ (_quant.gptq(w, h, 4, 32, "float", act_order=True, clip=c).dequantize() - w).T)
           for c in (False, True)}
    assert err[True] < 0.95 * err[False], err


def test_int8_input_rounding_imitates_matmulnbits_accuracy_level_4():
    """The layer-by-layer calibration walk imitates MatMulNBits accuracy_level 4 (inputs rounded to int8 per block):
    its output matches ONNX Runtime's to rounding, the plain fp32 product does not."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from optpipe.layerwise import Int8ActLinear

    rng = np.random.default_rng(1)
    k, n, block = 256, 64, 32
    w = rng.normal(size=(n, k)).astype(np.float32)
    qw = _quant.rtn(w, 4, block, "int")
    b, scales, zp = _quant.pack_matmulnbits(qw, 4)
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "s"),
                               numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    x = (rng.normal(size=(8, k)) * rng.uniform(0.1, 4, size=k)).astype(np.float32)
    y_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight = torch.nn.Parameter(torch.from_numpy(qw.dequantize()), requires_grad=False)
    y_fp32 = lin(torch.from_numpy(x)).detach().numpy()
    lin.__class__, lin.act_block = Int8ActLinear, block
    y_int8 = lin(torch.from_numpy(x)).detach().numpy()
    err_fp32, err_int8 = np.abs(y_fp32 - y_ort).max(), np.abs(y_int8 - y_ort).max()
    assert err_int8 < 0.01 * err_fp32, (err_int8, err_fp32)  # measured: 4e-5 vs 0.84


def test_relative_error_and_its_summary_by_hand():
    """The one weight-error formula every quantize pass reports: ||approx - exact|| / ||exact||."""
    exact = np.array([[3.0, 4.0]])  # norm 5
    assert _quant.relative_error(exact + [[0.0, 1.0]], exact) == pytest.approx(0.2)
    assert _quant.relative_error(exact, exact) == 0.0
    assert _quant.error_summary([0.1, 0.3]) == {"weight_rel_error_mean": 0.2, "weight_rel_error_max": 0.3}
    assert _quant.error_summary([]) == {"weight_rel_error_mean": None, "weight_rel_error_max": None}


def test_every_gptq_pass_shares_one_damp_default():
    from optpipe.passes.qdq_int4 import QdqInt4Config
    from optpipe.passes.quantize_int4 import Int4Config
    from optpipe.passes.torch_quantize import TorchInt4Config

    assert QdqInt4Config().damp == Int4Config().damp == TorchInt4Config().damp == _quant.GPTQ_DAMP
    with pytest.raises(ValueError, match="option `group_size` is now `block_size`"):
        TorchInt4Config(group_size=64)


def test_hessian_sum_is_2_over_n_xtx_whatever_the_batching():
    import torch

    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 6)).astype(np.float32) for n in (5, 9, 1)]
    x = np.concatenate(parts).astype(np.float64)
    expect = 2.0 / x.shape[0] * x.T @ x
    reduce = _quant.HessianSum.reducer()
    acc = None
    for p in parts:  # numpy rows (ONNX Runtime outputs) and torch rows (forward hooks) alike
        acc = reduce(acc, p if acc is None else torch.from_numpy(p))
    assert acc.tokens == 15 and np.allclose(acc.hessian(), expect, rtol=1e-12)
    f32 = _quant.HessianSum(torch.float32)
    for p in parts:
        f32.add(p.reshape(1, -1, 6))  # [batch, tokens, features] rows are flattened
    h = f32.hessian()
    assert h.dtype == np.float32 and np.allclose(h, expect, rtol=1e-5)
    with pytest.raises(ValueError, match="no calibration tokens"):
        _quant.HessianSum().hessian()


def test_one_packing_and_one_int8_rounding_for_every_format():
    codes = np.array([[1, 2, 15, 0], [7, 8, 3, 4]])
    assert _quant.pack_bits(codes, 4).tolist() == [[0x21, 0x0F], [0x87, 0x43]]  # first code in the low nibble
    signed = np.array([-8, 7, -1, 0], np.int8)  # ONNX INT4: two's-complement nibbles
    assert _quant.pack_bits(signed, 4).tolist() == [0x78, 0x0F]
    w = np.array([[0.5, -1.0], [0.0, 0.0], [2.54, 0.01]], np.float32)  # rows: a channel each (axis 0)
    q, scale = _quant.symmetric_int8(w, axis=0)
    assert scale.tolist() == pytest.approx([1 / 127, 1.0, 2.54 / 127])
    assert q[0].tolist() == [64, -127] and q[1].tolist() == [0, 0] and q[2].tolist() == [127, 0]
    qt, st = _quant.symmetric_int8(w.T, axis=1)  # the same channels laid out as columns
    assert (qt.T == q).all() and (st == scale).all()


def test_one_selector_names_why_each_weight_was_left_out():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
             "lm_head"]
    chosen, skipped = _quant.select(names, include=[r"layers\.0\.", "lm_head"], exclude=["down_proj$"])
    assert chosen == ["model.layers.0.self_attn.q_proj", "lm_head"]
    assert skipped == {"model.layers.0.mlp.down_proj": "excluded by pattern 'down_proj$'",
                       "model.layers.1.mlp.down_proj": "not matched by include"}
    assert _quant.select(names, [], [])[0] == names  # empty include: everything


def test_unpack_bits_undoes_pack_bits():
    codes = np.random.default_rng(0).integers(0, 16, (3, 7)).astype(np.uint8)
    padded = np.concatenate([codes, np.zeros((3, 1), np.uint8)], axis=1)
    assert (_quant.unpack_bits(_quant.pack_bits(padded, 4), 4, 7) == codes).all()


@pytest.mark.parametrize("bits,nb,block", [(4, 18, 32), (4, 3, 32), (4, 48, 32), (8, 6, 16), (2, 5, 16)])
def test_integer_form_carries_the_float_zero_point_in_digit_blocks(bits, nb, block):
    """integer_form(d*q + m): the same codes against z = round(-m/d), then the remainder R' = m + d*z as digit
    blocks; summing each block's digits at position b gives block b's R' to within the last digit's half step
    (two digits: max|R'| / (2 * levels^2) per row), far below what dropping R' (plain integer zero points) costs."""
    rng = np.random.default_rng(nb + bits)
    n, top = 12, (1 << bits) - 1
    d = rng.uniform(0.01, 0.05, (n, nb)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(0, top, (n, nb))).astype(np.float16).astype(np.float32)
    q = rng.integers(0, top + 1, (n, nb, block)).astype(np.uint8)
    qw = _quant.QuantizedWeight(q, d, np.zeros((n, nb), np.uint8), m)
    form = _quant.integer_form(qw, bits, np.float16)
    extra = _quant.remainder_blocks(nb, block)
    assert form.minimum is None and form.q.shape == (n, nb + extra, block) and form.scale.shape == (n, nb + extra)
    assert (form.q[:, :nb] == q).all() and (form.scale == form.scale.astype(np.float16)).all()  # stored as float16
    assert (form.zero[:, nb:] == 1 << (bits - 1)).all()
    values = (form.q.astype(np.float32) - form.zero[..., None]) * form.scale[..., None]  # [n, blocks, block]
    digits = values[:, nb:].reshape(n, _quant.REMAINDER_DIGITS, -1).sum(1)[:, :nb]  # R' per block
    got = values[:, :nb] + digits[..., None]
    want = q * d[..., None] + m[..., None]
    r = m + d * np.clip(np.round(-m / d), 0, top)
    levels = (1 << (bits - 1)) - 1
    bound = np.abs(r).max(1, keepdims=True) / (2 * levels ** _quant.REMAINDER_DIGITS) * 1.01 + 1e-6 * np.abs(want).max()
    assert (np.abs(got - want).max(-1) <= bound).all()
    dropped = np.abs(values[:, :nb] - want).max()
    assert np.abs(got - want).max() < dropped / (4 if bits == 2 else 20)
    assert _quant.integer_form(_quant.rtn(want.reshape(n, -1), bits, block, "int"), bits) is not None  # no-op path


def test_fit_blocks_keeps_what_a_block_size_divides_and_says_what_would_fit_them_all():
    """SmolLM2's shape at block 128: the 576-wide inputs (q/k/v, gate/up) stay float, down_proj's 1536 fits."""
    skipped = {"lm_head": "excluded by pattern 'lm_head'"}
    fit, notes = _quant.fit_blocks({"q": 576, "up": 576, "down": 1536}, 128, skipped)
    assert fit == {"down"}
    assert skipped == {"lm_head": "excluded by pattern 'lm_head'", "q": "K=576 is not a multiple of block_size 128",
                       "up": "K=576 is not a multiple of block_size 128"}
    assert notes == ["2 of 3 selected linears stay float: input width 576 is not a multiple of block_size 128 "
                     "(block sizes that fit every one: 16, 32, 64)"]
    assert _quant.fit_blocks({"q": 576, "down": 1536}, 64, {}) == ({"q", "down"}, [])
    assert _quant.fit_blocks({"odd": 100}, 32, {}, "in_features")[1] == [
        "1 of 1 selected linears stay float: input width 100 is not a multiple of block_size 32"]
