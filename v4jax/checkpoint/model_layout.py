"""The model layout: what a converted checkpoint stores and `load_pretrained` reads.

A flat dict keyed by published names (no transposes: weights stay [out, in]):
- BF16 tensors -> `cfg.dtype`, F32 stay float32, `tid2eid` int64 -> int32;
- FP8 linears: `X.weight` dequantised to `cfg.dtype` (E4M3 codes when kept quantised)
  and `X.scale` as float32 values of the same block grid, kept so that export
  re-encodes the original bytes;
- `attn.wo_a` always dequantised (as the reference does) and grouped
  [o_groups, o_lora_rank, heads * head_dim / o_groups];
- routed experts stacked per layer and projection: `….ffn.experts.w1.weight`
  [E, out, in] (kept quantised: packed int8 [E, out, in/2] or E4M3 [E, out, in]) and
  `….ffn.experts.w1.scale` [E, …] float32.

Each published weight (with its scale) or stack of per-expert weights is one
`QuantizedUnit` unit, everything else a `PlainUnit` one. Leaves are read window by window
(the slice a device holds) straight from the published files; `encode` is the
inverse transform export uses.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import quant
from v4jax.errors import CheckpointError
from v4jax.checkpoint.reader import PublishedCheckpoint
from v4jax.checkpoint.safetensors_format import NUMPY_DTYPES
from v4jax.config import ModelConfig
from v4jax.checkpoint.inventory import TensorSpec, published_tensors

_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(w[123])\.weight")


@functools.partial(jax.jit, static_argnames="dtype")
def _dequant(codes, scale, dtype):
    """quant.dequant (the decoder the model uses inside kept-quantised matmuls), narrowed to
    bfloat16 by dropping the low half of each float32: the values are codes times powers of
    two, which bfloat16 holds exactly, and XLA:CPU's rounding conversion is several times slower."""
    values = quant.dequant(codes, scale, jnp.float32)
    if dtype != jnp.bfloat16:
        return values.astype(dtype)
    high = jax.lax.bitcast_convert_type(values, jnp.uint32) >> 16
    return jax.lax.bitcast_convert_type(high.astype(jnp.uint16), jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class PlainUnit:
    spec: TensorSpec


@dataclasses.dataclass(frozen=True)
class QuantizedUnit:
    name: str  # leaves `{name}.weight` and `{name}.scale`
    members: tuple[str, ...]  # published prefixes: one, or one per expert of a stack
    weight: TensorSpec  # of the first member
    scale: TensorSpec
    groups: int = 0  # > 0: always dequantised, rows grouped [groups, out / groups] (wo_a)
    stacked: bool = False

    @property
    def fp4(self) -> bool:
        return self.weight.dtype == "I8"

    @property
    def logical_shape(self) -> tuple[int, int]:
        """[out, in] of one member's dequantised weight."""
        out, inp = self.weight.shape
        return (out, inp * 2) if self.fp4 else (out, inp)

    @property
    def dequantised_shape(self) -> tuple[int, ...]:
        """One member's dequantised leaf: [out, in], or [groups, out / groups, in]."""
        out, inp = self.logical_shape
        return (self.groups, out // self.groups, inp) if self.groups else (out, inp)


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    source_bytes: int  # bytes of the published tensors it is made of
    read: Callable[[PublishedCheckpoint, tuple[slice, ...]], np.ndarray]  # window -> values

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def units(cfg: ModelConfig) -> list[PlainUnit | QuantizedUnit]:
    """The published inventory grouped into conversion units, in published order."""
    specs = published_tensors(cfg)
    by_name = {s.name: s for s in specs}
    out: list[PlainUnit | QuantizedUnit] = []
    for s in specs:
        expert = _EXPERT.fullmatch(s.name)
        if expert and expert[2] == "0":  # the first expert opens the stack
            members = tuple(f"{expert[1]}.{e}.{expert[3]}" for e in range(cfg.n_routed_experts))
            out.append(QuantizedUnit(f"{expert[1]}.{expert[3]}", members, s, by_name[members[0] + ".scale"],
                                 stacked=True))
        elif expert or s.name.endswith(".scale"):
            continue
        elif s.dtype == "F8_E4M3":
            p = s.name.removesuffix(".weight")
            out.append(QuantizedUnit(p, (p,), s, by_name[p + ".scale"],
                                 groups=cfg.o_groups if p.endswith("attn.wo_a") else 0))
        else:
            out.append(PlainUnit(s))
    return out


def _unit_leaves(unit: PlainUnit | QuantizedUnit, cfg: ModelConfig, keep_quantized: bool) -> list[Leaf]:
    """The model-layout leaves one unit becomes."""
    if isinstance(unit, PlainUnit):
        s = unit.spec
        dtype = {"BF16": np.dtype(cfg.dtype), "F32": np.dtype(np.float32), "I64": np.dtype(np.int32)}[s.dtype]
        return [Leaf(s.name, s.shape, dtype, s.nbytes, lambda pub, index: _read_plain(pub, s.name, index, dtype))]
    lead = (len(unit.members),) if unit.stacked else ()
    dequant = not keep_quantized or unit.groups > 0
    if dequant:
        w_shape, w_dtype = unit.dequantised_shape, np.dtype(cfg.dtype)
    else:
        w_shape, w_dtype = unit.weight.shape, NUMPY_DTYPES[unit.weight.dtype]
    n = len(unit.members)
    return [
        Leaf(unit.name + ".weight", lead + w_shape, w_dtype, n * unit.weight.nbytes,
             lambda pub, index: _read_weight(pub, unit, index, lead + w_shape, w_dtype, dequant)),
        Leaf(unit.name + ".scale", lead + unit.scale.shape, np.dtype(np.float32), n * unit.scale.nbytes,
             lambda pub, index: _read_scale(pub, unit, index, lead + unit.scale.shape)),
    ]


def leaves(cfg: ModelConfig, keep_quantized: bool) -> list[Leaf]:
    return [leaf for unit in units(cfg) for leaf in _unit_leaves(unit, cfg, keep_quantized)]


def model_layout(cfg: ModelConfig, keep_quantized: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every leaf a checkpoint converted from `cfg` holds."""
    return {leaf.name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves(cfg, keep_quantized)}


# ---------------------------------------------------------------------------- reading
def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary: jax adopts such host buffers on the
    CPU without a copy, so a converted leaf exists once in memory, not twice."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n].view(dtype).reshape(shape)


def _window(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


# Bit patterns that are not finite numbers: `bits & mask == mask`. E4M3 (the "fn" variant) has no
# infinities, S.1111.111 is its NaN; 0xFF is E8M0's one NaN; BF16 and F32: the exponent all ones.
_NOT_FINITE = {"BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000), "F8_E4M3": (np.uint8, 0x7F),
               "F8_E8M0": (np.uint8, 0xFF)}
# Elements checked per step: the scratch stays cache-sized whatever the tensor (a whole-tensor
# `bits & mask` would hold 1.5 copies of a 500 MiB embedding beside it).
_CHECK_ELEMENTS = 1 << 20


def first_non_finite(raw: np.ndarray, dtype: str) -> list[int] | None:
    """Index of the first NaN / Inf (E4M3: NaN code) in `raw`, an array of safetensors `dtype`,
    or None. Integer compares on the raw bits, a bounded chunk at a time, cheap enough for the
    decode pass and needing no memory beyond a few MiB."""
    rule = _NOT_FINITE.get(dtype)
    if rule is None or raw.size == 0:
        return None
    view, mask = rule
    bits = np.ascontiguousarray(raw).reshape(-1).view(view)  # callers pass contiguous windows: no copy
    scratch = np.empty(min(bits.size, _CHECK_ELEMENTS), view)
    for start in range(0, bits.size, _CHECK_ELEMENTS):
        chunk = scratch[:min(_CHECK_ELEMENTS, bits.size - start)]
        np.bitwise_and(bits[start:start + chunk.size], view(mask), out=chunk)
        if chunk.max() == mask:  # some element has every masked bit set
            at = start + int(np.argmax(chunk == mask))
            return [int(i) for i in np.unravel_index(at, raw.shape)]
    return None


def non_finite_message(dtype: str) -> str:
    return f"holds a non-finite value ({'NaN code' if dtype == 'F8_E4M3' else 'NaN or Inf'})"


def check_finite(pub: PublishedCheckpoint, name: str, raw: np.ndarray, origin: tuple[int, ...]) -> None:
    """Refuse a non-finite value in a window of published tensor `name` that starts at `origin`,
    naming its file and the first bad index; runs on the window just read, while it is in cache."""
    loc = pub.tensors[name]
    at = first_non_finite(raw, loc.spec.dtype)
    if at is not None:
        at = [i + o for i, o in zip(at, origin)]
        raise CheckpointError(f"{loc.file}: tensor {name} {non_finite_message(loc.spec.dtype)} at {at}; "
                              "the model would compute NaN from it")


def _origin(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s.indices(n)[0] for s, n in zip(index, shape))


def _read_plain(pub: PublishedCheckpoint, name: str, index, dtype: np.dtype) -> np.ndarray:
    spec = pub.tensors[name].spec
    out = _aligned_empty(_window(index, spec.shape), dtype)
    if dtype == NUMPY_DTYPES[spec.dtype]:
        pub.read(name, index, out=out)
        check_finite(pub, name, out, _origin(index, spec.shape))
        return out
    raw = pub.read(name, index)
    check_finite(pub, name, raw, _origin(index, spec.shape))
    out[...] = raw  # BF16 -> float32 runs, tid2eid int64 -> int32
    return out


def _members(unit: QuantizedUnit, index: tuple[slice, ...]) -> tuple[tuple[str, ...], tuple[slice, ...]]:
    """The published members a window covers, and the rest of the window."""
    if unit.stacked:
        return unit.members[index[0]], tuple(index[1:])
    return unit.members, tuple(index)


def _read_scale(pub: PublishedCheckpoint, unit: QuantizedUnit, index, shape) -> np.ndarray:
    out = _aligned_empty(_window(index, shape), np.float32)
    members, rest = _members(unit, index)
    for i, m in enumerate(members):
        (out[i] if unit.stacked else out)[...] = pub.read(m + ".scale", rest)  # E8M0 -> float32 is exact
    return out


def _read_weight(pub: PublishedCheckpoint, unit: QuantizedUnit, index, shape, dtype, dequant: bool) -> np.ndarray:
    members, rest = _members(unit, index)
    if not dequant:
        out = _aligned_empty(_window(index, shape), dtype)
        for i, m in enumerate(members):
            codes = pub.read(m + ".weight", rest, out=out[i] if unit.stacked else out)
            check_finite(pub, m + ".weight", codes, _origin(rest, unit.weight.shape))
        return out
    if not unit.groups:
        rows, cols = (s.indices(n)[:2] for s, n in zip(rest, shape[-2:]))
        values = _decode(pub, unit, members, rows, cols, dtype)
        return values if unit.stacked else values[0]
    groups, rows, cols = rest  # published row g * per + r is grouped row [g, r]
    per, (c0, c1) = shape[-2], cols.indices(shape[-1])[:2]
    r0, r1, _ = rows.indices(per)
    return np.stack([_decode(pub, unit, members, (g * per + r0, g * per + r1), (c0, c1), dtype)[0]
                     for g in range(*groups.indices(unit.groups))])


def _decode(pub: PublishedCheckpoint, unit: QuantizedUnit, members: tuple[str, ...], rows: tuple[int, int],
            cols: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """Dequantised [member, r0:r1, c0:c1], decoded in one call over the enclosing scale
    blocks (128 x 128 for FP8, 1 x 32 for FP4). The decoder's output is the result itself
    (no copy) unless the window cuts a block."""
    (r0, r1), (c0, c1) = rows, cols
    n_rows, n_cols = unit.logical_shape
    block_r, block_c, pack = (1, quant.FP4_GROUP, 2) if unit.fp4 else (quant.FP8_BLOCK, quant.FP8_BLOCK, 1)
    lo_r, hi_r = r0 // block_r * block_r, min(-(-r1 // block_r) * block_r, n_rows)
    lo_c, hi_c = c0 // block_c * block_c, min(-(-c1 // block_c) * block_c, n_cols)
    code_window = (slice(lo_r, hi_r), slice(lo_c // pack, hi_c // pack))
    scale_window = (slice(lo_r // block_r, -(-hi_r // block_r)), slice(lo_c // block_c, -(-hi_c // block_c)))
    codes = _aligned_empty((len(members), hi_r - lo_r, (hi_c - lo_c) // pack), NUMPY_DTYPES[unit.weight.dtype])
    scales = _aligned_empty((len(members),) + _window(scale_window, unit.scale.shape), NUMPY_DTYPES[unit.scale.dtype])
    for i, m in enumerate(members):
        pub.read(m + ".weight", code_window, out=codes[i])
        check_finite(pub, m + ".weight", codes[i], (lo_r, lo_c // pack))
        pub.read(m + ".scale", scale_window, out=scales[i])
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # host-side decoding, whatever the default backend
        values = np.asarray(_dequant(codes, scales, dtype=dtype))
    if (lo_r, hi_r, lo_c, hi_c) == (r0, r1, c0, c1):
        return values
    return np.ascontiguousarray(values[:, r0 - lo_r:r1 - lo_r, c0 - lo_c:c1 - lo_c])


# ---------------------------------------------------------------------------- export
def encode(unit: PlainUnit | QuantizedUnit, leaves: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """Published tensors (name, array in the published numpy dtype) from model-layout leaves.

    A quantised weight given as codes is written as is; a dequantised one is
    re-encoded with its stored scales (which reproduces the original bytes of an
    unmodified weight) or, without them, with fresh power-of-two scales.
    """
    if isinstance(unit, PlainUnit):
        s = unit.spec
        value = _leaf(leaves, s.name, s.shape)
        yield s.name, value.astype(NUMPY_DTYPES[s.dtype])
        return
    lead = (len(unit.members),) if unit.stacked else ()
    weights = _leaf(leaves, unit.name + ".weight")
    kept = weights.dtype == NUMPY_DTYPES[unit.weight.dtype]
    _leaf(leaves, unit.name + ".weight", lead + (unit.weight.shape if kept else unit.dequantised_shape))
    scales = leaves.get(unit.name + ".scale")
    if scales is not None or kept:
        scales = _leaf(leaves, unit.name + ".scale", lead + unit.scale.shape)
    for i, m in enumerate(unit.members):
        w = weights[i] if unit.stacked else weights
        s = None if scales is None else (scales[i] if unit.stacked else scales)
        codes, s = (w, s) if kept else _requantize(w.reshape(unit.logical_shape), s, unit.fp4)
        yield m + ".weight", codes
        yield m + ".scale", quant.encode_e8m0(s) if unit.scale.dtype == "F8_E8M0" else np.asarray(s, np.float32)


def _leaf(leaves: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if name not in leaves:
        raise CheckpointError(f"leaf {name} is missing")
    value = leaves[name]
    if shape is not None and tuple(value.shape) != shape:
        raise CheckpointError(f"leaf {name} has shape {list(value.shape)}, expected {list(shape)}")
    return value


def _requantize(w: np.ndarray, stored: np.ndarray | None, fp4: bool) -> tuple[np.ndarray, np.ndarray]:
    quantize = quant.quantize_fp4 if fp4 else quant.quantize_fp8
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # host work, whatever the default backend
        if stored is None:
            return quantize(w)
        # An unmodified weight fits its stored scales exactly; a block whose values outgrew
        # them (fine-tuning) takes the larger scale a fresh encoding would pick.
        return quantize(w, np.maximum(stored, quantize(w)[1]))
