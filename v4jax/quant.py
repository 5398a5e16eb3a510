"""FP8 / FP4 codecs and the quantisation-aware simulation of the reference (spec §2.0, §2.13, §3.4, §3.5).

Decoders are jnp functions (they also accept numpy inputs), so the converter and
the in-matmul dequantisation of kept-quantised weights share one implementation.
Weight encoders are numpy: they run on the host when a checkpoint is written. All
power-of-two scales, on host and device, come from one function, `pow2_scale`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest E2M1 magnitude
FP8_BLOCK = 128  # weight block (both dims) and activation block
FP4_GROUP = 32  # inputs per FP4 weight scale and per FP4 fake-quant block
KV_FP8_BLOCK = 64  # fake-quant block for the non-RoPE KV dims
FP8_AMAX_FLOOR = 1e-4  # the reference's floor under a block's amax (an all-zero block gets scale 2^-22)
FP4_AMAX_FLOOR = FP4_MAX * 2.0**-126  # keeps every E2M1 block scale a normal float32 (>= 2^-126)

# fmt -> (largest code magnitude, amax floor, code dtype)
FORMATS = {"fp8": (FP8_MAX, FP8_AMAX_FLOOR, jnp.float8_e4m3fn), "fp4": (FP4_MAX, FP4_AMAX_FLOOR, jnp.float4_e2m1fn)}

# E2M1 code -> value; bit 3 is the sign.
FP4_TABLE = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


# ---------------------------------------------------------------------------- decoding
def scale_to_f32(scale):
    """Block scales as float32: E8M0 bytes (published) or float32 values (Base checkpoints)."""
    scale = jnp.asarray(scale)
    if scale.dtype == jnp.uint8:
        scale = jax.lax.bitcast_convert_type(scale, jnp.float8_e8m0fnu)
    return scale.astype(jnp.float32)


def expand_blocks(scale, shape, block: tuple[int, int]):
    """[..., ceil(o/bo), ceil(i/bi)] -> [..., o, i]; ragged trailing blocks are cut."""
    bo, bi = block
    out = jnp.repeat(jnp.repeat(scale, bo, axis=-2), bi, axis=-1)
    return out[..., : shape[-2], : shape[-1]]


def dequant_fp8(codes, scale, dtype=jnp.bfloat16):
    """codes: [..., o, i] float8_e4m3fn, scale: [..., ceil(o/128), ceil(i/128)] -> [..., o, i] dtype.

    Exact in bf16: codes carry 4 significant bits and the scale is a power of two.
    """
    codes = jnp.asarray(codes)
    s = expand_blocks(scale_to_f32(scale), codes.shape, (FP8_BLOCK, FP8_BLOCK))
    return (codes.astype(jnp.float32) * s).astype(dtype)


def unpack_fp4(packed):
    """packed: [..., o, i/2] int8, low nibble = even column -> [..., o, i] float32 E2M1 values."""
    b = jnp.asarray(packed)
    if b.dtype == jnp.int8:
        b = jax.lax.bitcast_convert_type(b, jnp.uint8)
    table = jnp.asarray(FP4_TABLE)
    codes = jnp.stack([b & 0xF, b >> 4], axis=-1)  # [..., o, i/2, 2]
    return table[codes.astype(jnp.int32)].reshape(*b.shape[:-1], b.shape[-1] * 2)


def dequant_fp4(packed, scale, dtype=jnp.bfloat16):
    """packed: [..., o, i/2] int8, scale: [..., o, i/32] -> [..., o, i] dtype."""
    values = unpack_fp4(packed)
    s = jnp.repeat(scale_to_f32(scale), FP4_GROUP, axis=-1)
    return (values * s).astype(dtype)


def dequant(weight, scale, dtype):
    """Dequantise a kept-quantised weight, FP4 if it is packed int8, else FP8."""
    if weight.dtype == jnp.int8:
        return dequant_fp4(weight, scale, dtype)
    return dequant_fp8(weight, scale, dtype)


# ---------------------------------------------------------------------------- encoding (host)
def _blocks(w: np.ndarray, bo: int, bi: int) -> np.ndarray:
    """[o, i] -> [ceil(o/bo), ceil(i/bi), bo, bi] zero-padded."""
    o, i = w.shape
    po, pi = -o % bo, -i % bi
    w = np.pad(w, ((0, po), (0, pi)))
    return w.reshape(w.shape[0] // bo, bo, w.shape[1] // bi, bi).transpose(0, 2, 1, 3)


def quantize_fp8(w: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[o, i] float -> (float8_e4m3fn codes [o, i], float32 power-of-two scales [o/128, i/128]).

    With `scale` given (the scales a checkpoint was read with), values that were
    dequantised from it encode back to the very same codes.
    """
    w = np.asarray(w, np.float32)
    if scale is None:
        amax = np.abs(_blocks(w, FP8_BLOCK, FP8_BLOCK)).max(axis=(-1, -2))
        scale = np.asarray(pow2_scale(amax, "fp8"))
    s = np.asarray(expand_blocks(np.asarray(scale, np.float32), w.shape, (FP8_BLOCK, FP8_BLOCK)))
    codes = np.clip(w / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return codes, np.asarray(scale, np.float32)


def quantize_fp4(w: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[o, i] float -> (packed int8 [o, i/2], float32 power-of-two scales [o, i/32])."""
    w = np.asarray(w, np.float32)
    o, i = w.shape
    if scale is None:
        amax = np.abs(w.reshape(o, i // FP4_GROUP, FP4_GROUP)).max(-1)
        scale = np.asarray(pow2_scale(amax, "fp4"))
    s = np.repeat(np.asarray(scale, np.float32), FP4_GROUP, axis=-1)
    values = np.clip(w / s, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn)
    codes = values.view(np.uint8) & 0xF  # ml_dtypes stores one E2M1 code per byte
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, np.asarray(scale, np.float32)


def encode_e8m0(scale: np.ndarray) -> np.ndarray:
    """float32 powers of two -> float8_e8m0fnu (exact)."""
    return np.asarray(scale, np.float32).astype(ml_dtypes.float8_e8m0fnu)


# ---------------------------------------------------------------------------- storage rounding
def round_to(x, dtype):
    """x cast to `dtype` with the rounding kept under jit.

    XLA's default excess precision lets a fusion drop a float32 -> bf16 -> float32
    pair of casts; where the reference stores a bf16 tensor that float32 math then
    reads (pooled compressor entries, say), that would skip its rounding.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < jnp.finfo(x.dtype).bits:
        info = jnp.finfo(dtype)
        x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x.astype(dtype)


# ---------------------------------------------------------------------------- scales
@partial(jax.jit, static_argnames="fmt")
def pow2_scale(amax, fmt: str):
    """UE8M0 block scale 2^ceil(log2(max(amax, floor) / qmax)), exactly: float32 [...] -> float32 [...].

    As the reference's fast_round_scale: r = max(amax, floor) * (1/qmax) in float32,
    then the exponent of r, plus one unless r's mantissa bits are zero (r a power of
    two). Floating log2 is not exact on powers of two, so it is never used. The
    floors keep r a normal float32. Host encoders call this same jitted function.
    """
    qmax, floor, _ = FORMATS[fmt]
    r = jnp.maximum(jnp.asarray(amax, jnp.float32), floor) * jnp.float32(1 / qmax)
    bits = jax.lax.bitcast_convert_type(r, jnp.uint32)  # sign bit 0: r > 0
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)  # biased, rounded up
    return jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)


# ---------------------------------------------------------------------------- simulation
def fake_quant_fp8(x, block: int):
    """Round x to E4M3 with one power-of-two scale per `block` values of the last dim.

    x: [..., n]. Used for activations entering FP8/FP4 linears (block 128) and for
    the non-RoPE KV dims (block 64). A ragged last block (tiny test dims only) is
    zero-padded, which leaves its amax unchanged. Returns x's dtype.
    """
    q, s, unblock = _round_blocks(x, block, "fp8")
    return unblock(q.astype(jnp.float32) * s).astype(x.dtype)


def fake_quant_fp4(x, block: int = FP4_GROUP):
    """Round x to E2M1 (nearest, ties to even) with one power-of-two scale per `block` values."""
    q, s, unblock = _round_blocks(x, block, "fp4")
    return unblock(q.astype(jnp.float32) * s).astype(x.dtype)


def encode_blocks(x, block: int, fmt: str):
    """The codes and scales `fake_quant_fp8` / `fake_quant_fp4` round x to, for storing them.

    x: [..., n] with n a multiple of `block`; fmt "fp8" (E4M3) or "fp4" (E2M1).
    Returns codes [..., n] (float8_e4m3fn or float4_e2m1fn) and power-of-two scales
    [..., n / block] float8_e8m0fnu; codes * scales is exactly the fake-quantised x.
    """
    q, s, _ = _round_blocks(x, block, fmt)
    return q.reshape(x.shape), s[..., 0].astype(jnp.float8_e8m0fnu)


def decode_blocks(codes, scales, dtype):
    """codes: [..., n] FP8/FP4 values, scales: [..., n / block] -> [..., n] dtype (inverse of encode_blocks)."""
    block = codes.shape[-1] // scales.shape[-1]
    q = codes.astype(jnp.float32).reshape(*scales.shape, block)
    return (q * scales.astype(jnp.float32)[..., None]).reshape(codes.shape).astype(dtype)


def _round_blocks(x, block: int, fmt: str):
    """Per block of the last dim: scale s = pow2_scale(amax), codes clip(x / s) rounded to fmt (nearest, ties to even).

    Returns codes [..., blocks, block], float32 s [..., blocks, 1] and the inverse reshape.
    """
    qmax, _, dtype = FORMATS[fmt]
    xb, unblock = _to_blocks(x, block)
    s = pow2_scale(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), fmt)
    return jnp.clip(xb / s, -qmax, qmax).astype(dtype), s, unblock


def _to_blocks(x, block: int):
    """[..., n] -> float32 [..., ceil(n/block), block] and the inverse reshape."""
    n = x.shape[-1]
    pad = -n % block
    xb = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    xb = xb.reshape(*x.shape[:-1], (n + pad) // block, block)
    return xb, lambda y: y.reshape(*x.shape[:-1], n + pad)[..., :n]


def sylvester_hadamard(n: int) -> np.ndarray:
    """[n, n] float32 Sylvester-ordered Hadamard matrix of +-1 entries (unnormalised, symmetric)."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h
