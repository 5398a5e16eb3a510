"""Linear layers in the published orientation: y = x Wᵀ with W: [out, in].

Keeping [out, in] makes the FP8 weight blocks line up with their [out/128, in/128]
scales and makes conversion and export pure renames (spec §5.1).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from v4jax import quant
from v4jax.config import ModelConfig
from v4jax.params import Quantized, normal, param


def matmul_t(x, w, out_dtype):
    """x: [..., in], w: [out, in] -> [..., out]; float32 accumulation as the reference GEMMs."""
    return quant.round_to(jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32), out_dtype)


def kernel(owner: nnx.Module, dtype):
    """owner.weight in `dtype`, dequantised with owner.scale when the weight is kept quantised."""
    if hasattr(owner, "scale"):
        return quant.dequant(owner.weight[...], owner.scale[...], dtype)
    return owner.weight[...].astype(dtype)


def unit_scale(in_dim: int) -> float:
    """The power of two nearest in_dim^-1/2: the scale that gives random unit codes a unit-variance output."""
    return 2.0 ** -round(math.log2(in_dim) / 2)


def random_fp8(rngs: nnx.Rngs, shape: tuple[int, ...], axes) -> tuple[nnx.Variable, nnx.Variable]:
    """Random E4M3 codes [..., out, in] and their [..., out/128, in/128] block scales.

    Codes of unit scale times one power-of-two block scale: valid FP8 data for a
    freshly built model (real weights come from a checkpoint).
    """
    *lead, out_dim, in_dim = shape
    blocks = (*lead, -(-out_dim // quant.FP8_BLOCK), -(-in_dim // quant.FP8_BLOCK))
    return (param(normal(rngs, shape, 1.0, jnp.float8_e4m3fn), axes, Quantized),
            param(jnp.full(blocks, unit_scale(in_dim), jnp.float32), axes, Quantized))


class Linear(nnx.Module):
    """A linear layer; `fp8=True` marks the ones the published checkpoint stores in FP8.

    Those quantise their input activation to FP8 in blocks of 128 when the
    quantisation-aware simulation is on (spec §2.0) and, with `cfg.quantized`, keep
    E4M3 codes + block scales as parameters and dequantise inside the matmul.
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: ModelConfig, rngs: nnx.Rngs,
                 axes: tuple[str | None, str | None], *, fp8: bool):
        self.act_quant = fp8 and cfg.quant_sim
        if fp8 and cfg.quantized:
            self.weight, self.scale = random_fp8(rngs, (out_dim, in_dim), axes)
        else:
            self.weight = param(normal(rngs, (out_dim, in_dim), in_dim**-0.5, cfg.dtype), axes)

    def kernel(self, dtype):
        return kernel(self, dtype)

    def __call__(self, x, out_dtype=None):
        if self.act_quant:
            x = quant.fake_quant_fp8(x, quant.FP8_BLOCK)
        y = matmul_t(x, self.kernel(x.dtype), out_dtype or x.dtype)
        if hasattr(self, "lora"):  # a LoRA adapter (v4jax.lora), on the same input as the base
            y = y + self.lora(x).astype(y.dtype)
        return y
