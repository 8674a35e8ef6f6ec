"""Block-wise weight quantization for ONNX Runtime's MatMulNBits: RTN and GPTQ, three zero-point schemes.

Weights are W[N, K] (output, input); blocks of `block` run along K, as MatMulNBits and GGUF both lay them out.
- `float` zero point: w ≈ d*q + m with a float minimum m (GGUF Q4_1's grid). MatMulNBits only takes integer
  zero points on its fast path, so the weight is stored in `integer_form`: d*(q - z) with z = round(-m/d), and
  the remainder R' = m + d*z (|R'| <= d/2) as two digits in extra blocks that multiply x's block sums.
- `int` zero point: asymmetric with an integer zero point (what ONNX Runtime's own quantizer writes).
- `symmetric`: w ≈ d*(q - 2^(bits-1)) (Q4_0 / Q8_0 style; for 4 bits d may be negative to use level -8).
- `symmetric-positive`: the same with d > 0 and no zero point, as TensorRT's INT4 expects: d is set from
  ±(2^(bits-1) - 1) (clipped for least error), codes in TensorRT's range [-2^(bits-1), 2^(bits-1) - 1], so only
  a clipped negative value takes the lowest code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
GPTQ_DAMP = 0.01  # the one default for every GPTQ pass: fraction of the Hessian's mean diagonal added to it

# Recipe option types, the same in every pass that has the option: GPTQ's dampening, how block scales are stored.
Damp = Annotated[float, Field(GPTQ_DAMP, gt=0, lt=1, description="GPTQ Hessian dampening: fraction of the mean "
                                                                 "diagonal added (small calibration sets may need more)")]
ScaleDtype = Annotated[Literal["float16", "float32"], Field(
    "float16", description="float16 (as GGUF/GPTQ checkpoints store them; codes fitted against the rounded scales) "
    "saves a bit per weight at block 32; ONNX Runtime casts them to float32 once, when it loads the model")]


class HessianSum:
    """GPTQ's Hessian of one linear's input, H = 2/n * sum over calibration tokens of x^T x: the one accumulation
    every GPTQ path uses (ONNX graph activations, PyTorch forward hooks, the layer-by-layer streaming walk).

    float64 by default (in-memory models: the sum of thousands of outer products); the streaming walk asks for
    float32, accumulated in place — a 13B down_proj's is 13824^2, and a float64 copy would add 1.5 GB."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype, self.sum, self.tokens = dtype, None, 0

    def add(self, x) -> HessianSum:
        """Add rows x [tokens, features] (a torch tensor or numpy array)."""
        x = torch.as_tensor(x).reshape(-1, x.shape[-1]).to(self.dtype)
        self.sum = x.T @ x if self.sum is None else self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]
        return self

    @classmethod
    def reducer(cls, dtype: torch.dtype = torch.float64):
        """`reduce(previous, rows)` for the calibration hooks: starts a sum on the first rows."""
        return lambda prev, x: (prev if prev is not None else cls(dtype)).add(x)

    def hessian(self) -> np.ndarray:
        """2/n * sum, scaled in place (the running sum is not kept)."""
        if self.sum is None or not self.tokens:
            raise ValueError("no calibration tokens reached this layer")
        h = self.sum.numpy()
        h *= 2.0 / self.tokens
        self.sum = None
        return h


def select(names, include: list[str], exclude: list[str]) -> tuple[list[str], dict[str, str]]:
    """The one weight selector of every quantize pass (ONNX MatMuls, torch Linears): a name is chosen when an
    `include` regex matches it (or include is empty) and no `exclude` regex does (`re.search`, so `lm_head`
    also matches `model.lm_head`). Returns (chosen in order, skipped name -> why)."""
    import re

    chosen, skipped = [], {}
    for name in names:
        if include and not any(re.search(p, name) for p in include):
            skipped[name] = "not matched by include"
            continue
        hit = next((p for p in exclude if re.search(p, name)), None)
        if hit:
            skipped[name] = f"excluded by pattern {hit!r}"
            continue
        chosen.append(name)
    return chosen, skipped


BLOCK_SIZES = (16, 32, 64, 128)


def fit_blocks(widths: dict[str, int], block: int, skipped: dict[str, str], what: str = "K") -> tuple[set[str], list[str]]:
    """The selected linears (name -> input width) a block size can quantize; the others go to `skipped` with the
    reason, and a note says how many stay float and which block sizes would fit them all (a 576-wide model at
    block 128 keeps every linear that reads the hidden state in float, and its gates may still pass)."""
    misfit = {name: k for name, k in widths.items() if k % block}
    skipped.update({name: f"{what}={k} is not a multiple of block_size {block}" for name, k in misfit.items()})
    if not misfit:
        return set(widths), []
    fit = [b for b in BLOCK_SIZES if all(k % b == 0 for k in widths.values())]
    return set(widths) - set(misfit), [
        f"{len(misfit)} of {len(widths)} selected linears stay float: input width "
        f"{', '.join(map(str, sorted(set(misfit.values()))))} is not a multiple of block_size {block}"
        + (f" (block sizes that fit every one: {', '.join(map(str, fit))})" if fit else "")]


def symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric INT8 of `w`, one scale per index of `axis` (max |w| / 127 over the others; codes in
    ±127; an all-zero channel gets scale 1): the one rounding of the int8 weight formats (TensorRT Q/DQ per output
    column, cpu-torch Int8Linear per row). Returns (codes int8, scales float32)."""
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    scale = np.abs(w).max(axis=other, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1)


def relative_error(approx, exact) -> float:
    """||approx - exact|| / ||exact||: the weight error every quantize pass reports (0 on an exact grid)."""
    approx, exact = np.asarray(approx, np.float32), np.asarray(exact, np.float32)
    return float(np.linalg.norm(approx - exact) / max(float(np.linalg.norm(exact)), 1e-12))


def error_summary(errors: list[float]) -> dict:
    """The manifest's weight-error figures of a quantize pass (None when it quantized nothing)."""
    return {"weight_rel_error_mean": round(float(np.mean(errors)), 5) if errors else None,
            "weight_rel_error_max": round(float(np.max(errors)), 5) if errors else None}


@dataclass
class QuantizedWeight:
    q: np.ndarray  # uint8 codes [N, nb, block]
    scale: np.ndarray  # [N, nb]
    zero: np.ndarray  # uint8 [N, nb]: the integer zero point (2^(bits-1) for the symmetric schemes)
    minimum: np.ndarray | None  # [N, nb] the float zero point (w = d*q + m; `zero` unused), or None

    def dequantize(self) -> np.ndarray:
        if self.minimum is not None:
            w = self.q.astype(np.float32) * self.scale[..., None] + self.minimum[..., None]
        else:
            w = (self.q.astype(np.float32) - self.zero[..., None]) * self.scale[..., None]
        return w.reshape(w.shape[0], -1)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"q": self.q, "scale": self.scale, "zero": self.zero}
        return out if self.minimum is None else {**out, "minimum": self.minimum}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> QuantizedWeight:
        return cls(a["q"], a["scale"], a["zero"], a.get("minimum"))


def stored(x: np.ndarray, scale_dtype, what: str = "scale") -> np.ndarray:
    """`x` as it will be stored in `scale_dtype` (a numpy dtype or its name: "float16"), back in float32. A float16 scale too small to be represented
    becomes the smallest float16 (never 0: codes divide by it); one too large cannot be stored and is an error."""
    x = np.asarray(x, np.float32)
    if np.dtype(scale_dtype) == np.float32:
        return x
    with np.errstate(over="ignore"):
        y = x.astype(scale_dtype)
    if not np.isfinite(y).all():
        raise ValueError(f"a block {what} of {float(np.abs(x).max()):.4g} does not fit {np.dtype(scale_dtype).name}: "
                         "store scales in float32 (scale_dtype: float32)")
    if what == "scale":
        tiny = np.finfo(scale_dtype).smallest_subnormal
        y = np.where((y == 0) & (x != 0), np.copysign(tiny, x).astype(scale_dtype), y)
    return y.astype(np.float32)


def _params(wb: np.ndarray, bits: int, scheme: str, clip: bool = False, importance: np.ndarray | None = None,
            scale_dtype=np.float32):
    """Per-block quantizer parameters for wb[..., block], rounded to `scale_dtype` before any code is fitted:
    returns (scale, zero_int, minimum_or_None). `clip`: the
    "float" and "int" schemes search shrunken ranges (CLIP_GRID) for the least squared error per block, each
    element's error weighted by `importance` (broadcast to wb; e.g. the Hessian diagonal); the full range is the
    first candidate and is replaced only by a strictly smaller error, so weights on the grid stay exact."""
    qmax = (1 << bits) - 1
    if scheme == "symmetric-positive":  # w ≈ s*(q - 2^(b-1)), s > 0, no zero point (TensorRT)
        half = 1 << (bits - 1)
        amax = np.abs(wb).max(-1)
        best, best_err = None, None
        for f in CLIP_GRID:  # MSE-optimal clipping of the range, per block
            scale = stored(np.where(amax == 0, 1.0, f * amax / (half - 1)), scale_dtype)
            deq = (np.clip(np.round(wb / scale[..., None]), -half, half - 1)) * scale[..., None]
            err = ((deq - wb) ** 2).sum(-1)
            if best is None:
                best, best_err = scale, err
            else:
                take = err < best_err
                best, best_err = np.where(take, scale, best), np.where(take, err, best_err)
        return best, np.full(best.shape, half, np.float32), None
    if scheme == "symmetric":
        idx = np.abs(wb).argmax(-1)[..., None]
        extreme = np.take_along_axis(wb, idx, -1)[..., 0]
        half = 1 << (bits - 1)
        scale = extreme / -half if bits == 4 else np.abs(extreme) / (half - 1)
        scale = stored(np.where(scale == 0, 1.0, scale), scale_dtype)
        return scale, np.full(scale.shape, half, np.float32), None
    lo, hi = np.minimum(wb.min(-1), 0 if scheme == "int" else np.inf), wb.max(-1)
    if scheme == "int":
        hi = np.maximum(hi, 0)
    best = _range_params(lo, hi, qmax, scheme, scale_dtype)
    if not clip:
        return best
    weight = 1.0 if importance is None else importance
    best_err = ((_dequant(wb, *best, bits) - wb) ** 2 * weight).sum(-1)
    mid = (lo + hi) / 2
    for f in CLIP_GRID[1:]:
        lo_f, hi_f = mid - f * (mid - lo), mid + f * (hi - mid)
        if scheme == "int":
            lo_f, hi_f = np.minimum(lo_f, 0), np.maximum(hi_f, 0)
        cand = _range_params(lo_f, hi_f, qmax, scheme, scale_dtype)
        err = ((_dequant(wb, *cand, bits) - wb) ** 2 * weight).sum(-1)
        take = err < best_err
        best = tuple(None if b is None else np.where(take, c, b) for b, c in zip(best, cand))
        best_err = np.where(take, err, best_err)
    return best


def _range_params(lo, hi, qmax: int, scheme: str, scale_dtype=np.float32):
    scale = (hi - lo) / qmax
    scale = stored(np.where(scale == 0, 1.0, scale), scale_dtype)
    zero = np.clip(np.round(-lo / scale), 0, qmax).astype(np.float32)
    return scale, zero, (stored(lo, scale_dtype, "minimum") if scheme == "float" else None)


def _dequant(wb, scale, zero, minimum, bits):
    q = _codes(wb, scale, zero, minimum, bits)
    if minimum is not None:
        return q * scale[..., None] + minimum[..., None]
    return (q - zero[..., None]) * scale[..., None]


def _codes(wb, scale, zero, minimum, bits):
    qmax = (1 << bits) - 1
    if minimum is not None:
        return np.clip(np.round((wb - minimum[..., None]) / scale[..., None]), 0, qmax)
    return np.clip(np.round(wb / scale[..., None]) + zero[..., None], 0, qmax)


def _finish(q, scale, zero, minimum) -> QuantizedWeight:
    return QuantizedWeight(q.astype(np.uint8), scale, zero.astype(np.uint8), minimum)


def rtn(w: np.ndarray, bits: int, block: int, scheme: str, clip: bool = False, scale_dtype=np.float32) -> QuantizedWeight:
    n, k = w.shape
    wb = w.reshape(n, k // block, block).astype(np.float32)
    scale, zero, minimum = _params(wb, bits, scheme, clip, scale_dtype=scale_dtype)
    return _finish(_codes(wb, scale, zero, minimum, bits), scale, zero, minimum)


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block: int, scheme: str,
         damp: float = GPTQ_DAMP, cols_per_step: int = 128, act_order: bool = False,
         clip: bool = False, scale_dtype=np.float32) -> QuantizedWeight:
    """GPTQ (Frantar et al.): quantize column by column, spreading each column's error over the columns
    not yet quantized, weighted by the inverse Hessian of the layer input. Without `act_order` group parameters
    are fitted on the error-updated weights when a group starts; with it, columns go in order of decreasing
    Hessian diagonal (most activated first) and every group's parameters are fitted up front ("static groups").
    `clip`: each group's range is searched for the least Hessian-diagonal-weighted squared error (see _params)."""
    n, k = w.shape
    W = np.array(w, dtype=np.float64)  # copies
    H = np.array(hessian, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    nb = k // block
    qmax = (1 << bits) - 1
    importance = np.diag(H).astype(np.float32)
    # per-block parameters and codes are kept transposed ([nb, n], [k, n]): the loop below reads and writes one
    # column of W at a time, which is a contiguous row there (a strided column of a 27648-row weight is slow)
    scale = np.zeros((nb, n), np.float32)
    zero = np.zeros((nb, n), np.float32)
    minimum = np.zeros((nb, n), np.float32) if scheme == "float" else None
    if act_order:
        s_, z_, m_ = _params(W.reshape(n, nb, block).astype(np.float32), bits, scheme, clip,
                             importance.reshape(1, nb, block), scale_dtype)
        scale[:], zero[:] = s_.T, z_.T
        if minimum is not None:
            minimum[:] = m_.T
        perm = np.argsort(-np.diag(H), kind="stable")
    else:
        perm = np.arange(k)
    if act_order:
        W, H = W[:, perm], H[np.ix_(perm, perm)]
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    # U, the upper Cholesky factor of H^-1 (H^-1 = U^T U), without forming H^-1: with J the reversal, the Cholesky
    # factor M of J H J gives H = R R^T for the upper R = J M J, so U = R^-1. One Cholesky and one triangular solve
    # (1.7-2.4x faster than inverse + Cholesky, which matters at a 13B MLP's K = 13824, where each K x K float64
    # matrix is 1.5 GB); each intermediate is dropped as soon as the next exists, so at most two are alive.
    import torch

    r = torch.from_numpy(np.ascontiguousarray(H[::-1, ::-1]))
    del H
    r = torch.linalg.cholesky(r)  # each rebinding frees the previous matrix
    r = r.flip(0, 1)
    eye = torch.eye(k, dtype=r.dtype)
    U = torch.linalg.solve_triangular(r, eye, upper=True, out=eye).numpy()
    del r
    q = np.zeros((k, n), np.uint8)  # codes, transposed
    step = max(block, cols_per_step - cols_per_step % block)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[:, i1:i2].T.copy()  # [cols, n]
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]  # original column index
            b = col // block
            if not act_order and col % block == 0:
                s_, z_, m_ = _params(W1[i:i + block].T.astype(np.float32)[:, None, :], bits, scheme, clip,
                                     importance[col:col + block][None, None, :], scale_dtype)
                scale[b], zero[b] = s_[:, 0], z_[:, 0]
                if minimum is not None:
                    minimum[b] = m_[:, 0]
            s, z = scale[b].astype(np.float64), zero[b]
            if minimum is not None:
                code = np.clip(np.round((W1[i] - minimum[b]) / s), 0, qmax)
                deq = code * s + minimum[b]
            else:
                code = np.clip(np.round(W1[i] / s) + z, 0, qmax)
                deq = (code - z) * s
            q[col] = code
            err = (W1[i] - deq) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            E1[i] = err
        W[:, i2:] -= E1.T @ U[i1:i2, i2:]
    t = np.ascontiguousarray
    return _finish(t(q.T).reshape(n, nb, block), t(scale.T), t(zero.T), None if minimum is None else t(minimum.T))


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis, `8 // bits` codes a byte, first code in the lowest bits: the layout of MatMulNBits,
    ONNX INT4 tensors and the cpu-torch int4 modules alike (codes are taken modulo 2**bits, so signed INT4 values
    pack as two's-complement nibbles)."""
    per = 8 // bits
    grouped = (codes.astype(np.int16) & ((1 << bits) - 1)).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    grouped = grouped.astype(np.uint16)
    out = np.zeros(grouped.shape[:-1], np.uint16)
    for j in range(per):
        out |= grouped[..., j] << (bits * j)
    return out.astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """pack_bits undone along the last axis: the first `count` codes, one a byte."""
    per = 8 // bits
    codes = np.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], -1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


REMAINDER_DIGITS = 2  # digits of a float zero point's remainder in the integer form: 2 leave under d/400 of it


def remainder_blocks(nb: int, block: int) -> int:
    """Extra blocks (along K) the integer form of a float-zero-point weight has: each digit in whole blocks."""
    return REMAINDER_DIGITS * -(-nb // block)


def integer_form(qw: QuantizedWeight, bits: int, scale_dtype=np.float32) -> QuantizedWeight:
    """A float-zero-point weight (d*q + m) as integer zero points, which ONNX Runtime's fast kernel takes: the same
    codes with z = round(-m/d), and the remainder R' = m + d*z (|R'| <= d/2 where the block spans 0) as extra
    blocks that multiply x's block sums: digit i holds R' - (digits before) in `bits`-bit codes with one scale per
    row and block, so R'[n, b] = sum_i step_i[n] * (code_i[n, b] - 2^(bits-1)). Other weights are returned as they
    are. Steps are rounded to `scale_dtype` before their codes are fitted, like every scale."""
    if qw.minimum is None:
        return qw
    n, nb, block = qw.q.shape
    top, half = (1 << bits) - 1, 1 << (bits - 1)
    d, m = qw.scale, qw.minimum
    z = np.clip(np.round(-m / d), 0, top)
    e = -(-nb // block)
    rest = np.zeros((n, e * block), np.float32)
    rest[:, :nb] = m + d * z
    rest = rest.reshape(n, e, block)
    codes, steps = [], []
    for _ in range(REMAINDER_DIGITS):
        step = stored(np.abs(rest).max(-1) / (half - 1), scale_dtype)  # [n, e]
        code = np.clip(np.round(rest / np.where(step > 0, step, 1.0)[..., None]) + half, 0, top)
        rest = rest - (code - half) * step[..., None]
        codes.append(code.astype(np.uint8))
        steps.append(step)
    extra = np.full((n, REMAINDER_DIGITS * e), half, np.uint8)
    return QuantizedWeight(np.concatenate([qw.q] + codes, 1), np.concatenate([d] + steps, 1).astype(np.float32),
                           np.concatenate([z.astype(np.uint8), extra], 1), None)


def pack_matmulnbits(qw: QuantizedWeight, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B [N, nb, block*bits/8] uint8, scales [N*nb] float32, zero_points uint8 [N*ceil(nb*bits/8)]) of an
    integer-zero-point weight (a float one goes through `integer_form` first)."""
    n, nb, block = qw.q.shape
    per = 8 // bits
    z = qw.zero
    if nb % per:
        z = np.concatenate([z, np.zeros((n, per - nb % per), np.uint8)], axis=1)
    return pack_bits(qw.q, bits), qw.scale.reshape(-1).astype(np.float32), pack_bits(z, bits).reshape(-1)
