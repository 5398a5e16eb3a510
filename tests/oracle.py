"""Independent plain-numpy reference ("oracle") of the DeepSeek-V4 forward pass.

Written only from /work/shared/spec/v4-architecture.md (cited below as "spec X.Y"); it shares no
code with the `v4jax` package. Dependencies: numpy and ml_dtypes (the latter only to read the
ml_dtypes-typed input arrays; all decoding and rounding is done with explicit bit arithmetic).

Everything is computed in float64 and nothing is cast to bf16, so this is a *tight* reference
for the math. `quant_sim=True` additionally simulates the quantisation steps of spec 2.0/2.13
(FP8 activation quant of FP8/FP4 linears, FP8 KV fake-quant, Hadamard + FP4 indexer fake-quant).
`bf16=True` rounds to bf16 wherever the reference keeps a tensor in bf16 (spec 2.0: activations
at rest, linear outputs, the indexer scores), so the quantisation steps see bf16 inputs as in
the default mode; the math between those points stays float64.

Layout conventions: linear weights are in the published `[out, in]` orientation, `y = x @ W.T`.
All functions work on one sequence at a time (`S` = sequence length); `forward` loops over batch.
Positions always start at 0 (a whole prompt, as in the reference prefill).
"""
import math

import ml_dtypes
import numpy as np

F64 = np.float64

# =============================================================================================
# 1. Byte decoders (spec 3.4, 3.5)
# =============================================================================================

FP4_E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=F64)


def _as_bytes(b):
    """Raw byte values (int64) of a 1-byte array (uint8/int8/float8_*) or of integer values."""
    b = np.asarray(b)
    if b.dtype.itemsize == 1:
        b = b.view(np.uint8)
    return b.astype(np.int64) & 0xFF


def decode_e4m3(b):
    """Decode FP8 E4M3 'fn' bytes (spec 3.4): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
    bits, subnormals for exponent 0, no infinities, 0x7F/0xFF = NaN. Max finite = 448."""
    b = _as_bytes(b)                                            # b: [...] int
    sign = np.where(b & 0x80, -1.0, 1.0)
    e = (b >> 3) & 0xF
    m = b & 0x7
    mag = np.where(e == 0, m * 2.0 ** -9, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return sign * mag


def decode_e8m0(b):
    """Decode UE8M0 scale bytes (spec 3.4): value 2^(b-127); byte 0xFF = NaN."""
    b = _as_bytes(b)
    return np.where(b == 0xFF, np.nan, np.exp2(b - 127.0))


def decode_fp4_packed(packed):
    """Unpack FP4 E2M1 codes (spec 3.5). packed: int8 [out, in/2] -> float [out, in].
    Low nibble = even column 2j, high nibble = odd column 2j+1; bit 3 of a nibble = sign."""
    b = _as_bytes(packed)                                       # [out, in/2]
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), dtype=F64)
    out[..., 0::2] = FP4_E2M1_TABLE[b & 0xF]
    out[..., 1::2] = FP4_E2M1_TABLE[(b >> 4) & 0xF]
    return out


def _scale_values(scale):
    """Scale tensor -> float values: E8M0 bytes (float8_e8m0fnu or uint8) or float values."""
    scale = np.asarray(scale)
    if scale.dtype == np.uint8 or scale.dtype == ml_dtypes.float8_e8m0fnu:
        return decode_e8m0(scale)
    return scale.astype(F64)


def dequant_fp8_block(codes, scale, block=128):
    """spec 3.4: W[o,i] = e4m3(codes[o,i]) * scale[o//128, i//128].
    codes: uint8/float8_e4m3fn [o, i]; scale: [ceil(o/128), ceil(i/128)] E8M0 bytes or floats."""
    w = decode_e4m3(codes)                                      # [o, i]
    s = _scale_values(scale)                                    # [o/128, i/128]
    o, i = w.shape
    s_full = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:o, :i]
    return w * s_full


def dequant_fp4(packed, scale, block=32):
    """spec 3.5: W[o,i] = fp4(code(o,i)) * scale[o, i//32].
    packed: int8 [o, i/2]; scale: [o, i/32] E8M0 bytes (or float values)."""
    w = decode_fp4_packed(packed)                               # [o, i]
    s = _scale_values(scale)                                    # [o, i/32]
    return w * np.repeat(s, block, axis=1)[:, :w.shape[1]]


def dequantize_published(tensors):
    """Raw published tensors (spec 3.2-3.5, 3.9) -> dict of dequantised float64 arrays in [out, in]
    orientation, without `.scale` entries. A `X.weight` with a sibling `X.scale` is FP4 packed if
    its dtype is int8 (one scale per 32 inputs), else FP8 E4M3 codes with 128x128 block scales.
    `tid2eid` stays integer (int64); every other tensor (bf16/f32/...) is converted to float64."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".scale"):
            continue
        t = np.asarray(t)
        sname = name[:-len("weight")] + "scale" if name.endswith(".weight") else None
        if sname is not None and sname in tensors:
            if t.dtype == np.int8:
                out[name] = dequant_fp4(t, tensors[sname])
            else:
                out[name] = dequant_fp8_block(t, tensors[sname])
        elif name.endswith("tid2eid"):
            out[name] = t.astype(np.int64)
        else:
            out[name] = t.astype(F64)
    return out


# =============================================================================================
# 2. Formula functions
# =============================================================================================

def rms_norm(x, w, eps):
    """spec 2.10: RMSNorm_w(v) = w * v / sqrt(mean(v^2) + eps) over the last dim (w=None: weightless)."""
    x = np.asarray(x, F64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def _softmax(x, axis):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def rope_inv_freq(rope_dim, base, yarn=None):
    """spec 2.3: theta_i = base^(-2i/rope_dim), i = 0..rope_dim/2-1, optionally YaRN-corrected.
    yarn: dict with factor, original_max_position_embeddings, beta_fast, beta_slow (or None).
    low = floor(d_r ln(orig/(beta_fast 2pi)) / (2 ln base)), high = ceil(same with beta_slow),
    both clamped to [0, d_r-1]; ramp_i = clamp((i-low)/(high-low), 0, 1);
    theta_i <- theta_i/factor * ramp_i + theta_i * (1-ramp_i). No mscale anywhere."""
    half = rope_dim // 2
    i = np.arange(half, dtype=F64)
    inv = float(base) ** (-2.0 * i / rope_dim)                  # [d_r/2]
    if yarn:
        factor = float(yarn["factor"])
        orig = float(yarn["original_max_position_embeddings"])

        def corr_dim(beta):
            return rope_dim * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(float(yarn.get("beta_fast", 32)))), 0)
        high = min(math.ceil(corr_dim(float(yarn.get("beta_slow", 1)))), rope_dim - 1)
        if high == low:                 # not covered by the spec; avoid 0/0 (degenerate ramp)
            high = high + 0.001
        ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
        inv = inv / factor * ramp + inv * (1.0 - ramp)
    return inv


def apply_rope_interleaved(x, pos, inv_freq, inverse=False):
    """spec 2.3: rotate adjacent channel pairs (2i, 2i+1) of x by angle pos*theta_i
    (complex multiply; inverse=True uses -pos*theta_i, the output de-rotation).
    x: [S, ..., d_r]; pos: [S] (broadcast over the middle dims); inv_freq: [d_r/2]."""
    x = np.asarray(x, F64)
    pos = np.asarray(pos, F64)
    ang = pos.reshape(pos.shape + (1,) * (x.ndim - 1 - pos.ndim))[..., None] * inv_freq
    if inverse:
        ang = -ang
    c, s = np.cos(ang), np.sin(ang)                              # [S, 1.., d_r/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty(x.shape, dtype=F64)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def sinkhorn(L, iters, eps):
    """spec 2.2 step 4. L: [..., n, n] (row j, column k).
    C = rowsoftmax(L) + eps; C /= colsum + eps; then (iters-1) x [C /= rowsum + eps; C /= colsum + eps]."""
    C = _softmax(np.asarray(L, F64), axis=-1) + eps
    C = C / (C.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        C = C / (C.sum(axis=-1, keepdims=True) + eps)
        C = C / (C.sum(axis=-2, keepdims=True) + eps)
    return C


def _hc_mix(X, fn, norm_eps):
    """mu = flatten(X) fn^T / RMS(flatten(X)) (spec 2.2 steps 1-2). X: [S, n, D] -> [S, rows]."""
    S = X.shape[0]
    xh = X.reshape(S, -1)                                       # [S, n*D] stream-major
    return rms_norm(xh, None, norm_eps) @ fn.T


def hc_pre(X, fn, base, scale, hc_eps, norm_eps, iters):
    """spec 2.2 hc_pre. X: [S, n, D]; fn: [(2+n)n, nD]; base: [(2+n)n]; scale: [3].
    Returns y: [S, D] = sum_j pre_j X[j], post: [S, n], C: [S, n, n] (Sinkhorn)."""
    n = X.shape[1]
    mu = _hc_mix(X, fn, norm_eps)                               # [S, (2+n)n]
    pre = _sigmoid(mu[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * _sigmoid(mu[:, n:2 * n] * scale[1] + base[n:2 * n])
    L = (mu[:, 2 * n:] * scale[2] + base[2 * n:]).reshape(-1, n, n)
    C = sinkhorn(L, iters, hc_eps)
    y = np.einsum("sj,sjd->sd", pre, X)
    return y, post, C


def hc_post(o, X, post, C):
    """spec 2.2 hc_post: X'[k] = post_k * o + sum_j C[j,k] X[j].
    o: [S, D]; X: [S, n, D]; post: [S, n]; C: [S, n, n] -> [S, n, D]."""
    return post[:, :, None] * o[:, None, :] + np.einsum("sjk,sjd->skd", C, X)


def hc_head(X, fn, base, scale, hc_eps, norm_eps):
    """spec 2.2 head collapse: w_j = sigmoid(mu_j*scale + base_j) + hc_eps; h = sum_j w_j X[j].
    X: [S, n, D]; fn: [n, nD]; base: [n]; scale: [1] -> [S, D]."""
    mu = _hc_mix(X, fn, norm_eps)                               # [S, n]
    w = _sigmoid(mu * scale[0] + base) + hc_eps
    return np.einsum("sj,sjd->sd", w, X)


def compress(a, z, ratio, overlap):
    """spec 2.5 pooling. a, z: [S, k*c] (z already includes ape[p mod m]) -> entries [S//ratio, c].
    Non-overlap: entry i = sum over tokens of group i of softmax_t(z) * a, per channel.
    Overlap (k=2): slots = previous group's A halves (first c channels) + own group's B halves
    (last c channels); per-channel softmax over the 2m slots; group 0 has no previous slots."""
    a = np.asarray(a, F64)
    z = np.asarray(z, F64)
    m = ratio
    n = a.shape[0] // m
    c = a.shape[1] // 2 if overlap else a.shape[1]
    out = np.zeros((n, c), dtype=F64)
    for i in range(n):
        own = slice(i * m, (i + 1) * m)
        if overlap:
            aa, zz = a[own, c:], z[own, c:]                     # [m, c] B halves
            if i > 0:
                prev = slice((i - 1) * m, i * m)
                aa = np.concatenate([a[prev, :c], aa], axis=0)  # [2m, c]
                zz = np.concatenate([z[prev, :c], zz], axis=0)
        else:
            aa, zz = a[own], z[own]                             # [m, c]
        out[i] = np.sum(_softmax(zz, axis=0) * aa, axis=0)
    return out


def indexer_scores(q, k, w):
    """spec 2.6 step 3: I(t, i) = sum_h w[t,h] relu(q[t,h] . k[i]).
    q: [S, H_I, d_I]; k: [N, d_I]; w: [S, H_I] -> [S, N]."""
    dots = np.einsum("shd,nd->shn", q, k)
    return np.einsum("sh,shn->sn", w, np.maximum(dots, 0.0))


def indexer_topk(scores, positions, ratio, k):
    """spec 2.6 step 4: for each query (position p) the SET of the min(k, (p+1)//ratio) causal
    entries (i < (p+1)//ratio) with the largest score (ties broken towards the lower index).
    scores: [S, N] -> list of S Python sets of ints."""
    sel = []
    for t, p in enumerate(positions):
        n = (int(p) + 1) // ratio
        order = np.argsort(-scores[t, :n], kind="stable")[:min(k, n)]
        sel.append(set(int(i) for i in order))
    return sel


def attention_with_sink(q, kv_list, sink, scale):
    """spec 2.3 core attention: o = sum_j e^{s_j} kv_j / (sum_j e^{s_j} + e^{sink_h}),
    s_j = scale * q_h . kv_j (K = V). q: [S, H, d]; kv_list: S arrays [n_t, d]; sink: [H] (raw logit).
    Returns o: [S, H, d]."""
    S, H, d = q.shape
    o = np.zeros((S, H, d), dtype=F64)
    for t in range(S):
        kv = kv_list[t]                                         # [n_t, d]
        s = (q[t] @ kv.T) * scale                               # [H, n_t]
        mx = np.maximum(s.max(axis=-1, initial=-np.inf), sink)  # [H]
        e = np.exp(s - mx[:, None])
        denom = e.sum(axis=-1) + np.exp(sink - mx)
        o[t] = (e @ kv) / denom[:, None]
    return o


def grouped_out_proj(o, wo_a, wo_b, G, quant=False, bf16=False):
    """spec 2.3 grouped low-rank output projection.
    o: [S, H, d]; wo_a: [G*r_o, H*d/G]; wo_b: [D, G*r_o] -> [S, D].
    quant: FP8 activation quant on the wo_b input only (wo_a is a plain bf16 einsum, spec 2.0)."""
    S = o.shape[0]
    og = o.reshape(S, G, -1)                                    # [S, G, H*d/G]
    wa = wo_a.reshape(G, -1, og.shape[-1])                      # [G, r_o, H*d/G]
    u = _rest(np.einsum("sgi,gri->sgr", og, wa).reshape(S, -1), bf16)   # [S, G*r_o]
    return _rest(linear(u, wo_b, quant), bf16)


def gate_scores(x, W_g):
    """spec 2.9: s = sqrt(softplus(x W_g^T)). x: [S, D]; W_g: [E, D] -> [S, E]."""
    return np.sqrt(np.logaddexp(0.0, x @ W_g.T))


def route(scores, bias, tid2eid_rows, topk, route_scale):
    """spec 2.9 routing. scores: [S, E]; bias: [E] or None (selection only);
    tid2eid_rows: [S, k] (hash layers) or None. Returns (ids [S, k], weights [S, k]) with
    weights = s[sel] / sum s[sel] * route_scale."""
    if tid2eid_rows is not None:
        ids = np.asarray(tid2eid_rows, dtype=np.int64)
    else:
        sel = scores + (0.0 if bias is None else bias)
        ids = np.argsort(-sel, axis=-1, kind="stable")[:, :topk]
    w = np.take_along_axis(scores, ids, axis=-1)
    return ids, w / w.sum(axis=-1, keepdims=True) * route_scale


def _rest(x, bf16):
    """A tensor the reference keeps in bf16 (spec 2.0): rounded when emulating bf16, else as is."""
    return round_bf16(np.asarray(x, np.float32)).astype(F64) if bf16 else x


def swiglu_clamped(x, w1, w2, w3, limit, route_weight=1.0, quant=False, bf16=False):
    """spec 2.9 expert: g = min(x W1^T, L), v = clamp(x W3^T, -L, L), h = silu(g) v * route_weight,
    y = h W2^T. x: [N, D]; w1, w3: [F, D]; w2: [D, F]; route_weight: scalar or [N].
    quant: FP8 activation quant of x and of h (inputs of the FP8/FP4 linears).
    bf16: the W1 / W3 outputs rounded to bf16 as the reference's GEMMs return them."""
    xi = fp8_act_quant(x) if quant else x
    g = _rest(xi @ w1.T, bf16)
    v = _rest(xi @ w3.T, bf16)
    if limit:
        g = np.minimum(g, limit)
        v = np.clip(v, -limit, limit)
    h = g * _sigmoid(g) * v
    rw = np.asarray(route_weight, F64)
    h = _rest(h * (rw[:, None] if rw.ndim == 1 else rw), bf16)
    return _rest(linear(h, w2, quant), bf16)


def moe(x, token_ids, P, prefix, cfg, hash_layer, quant=False, bf16=False):
    """spec 2.9 MoE. x: [S, D] (after ffn_norm); token_ids: [S] (hash routing input).
    Routed experts (hash ids `gate.tid2eid[token]` or top-k of s + gate.bias) + shared expert."""
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    limit = cfg.get("swiglu_limit")
    rs = cfg["routed_scaling_factor"]
    s = gate_scores(x, P[prefix + "gate.weight"])               # [S, E]
    if hash_layer:
        ids, w = route(s, None, P[prefix + "gate.tid2eid"][token_ids], k, rs)
    else:
        ids, w = route(s, P.get(prefix + "gate.bias"), None, k, rs)
    y = np.zeros_like(x)
    for e in range(E):
        rows, slots = np.nonzero(ids == e)
        if rows.size == 0:
            continue
        ep = f"{prefix}experts.{e}."
        ye = swiglu_clamped(x[rows], P[ep + "w1.weight"], P[ep + "w2.weight"], P[ep + "w3.weight"],
                            limit, w[rows, slots], quant, bf16)
        np.add.at(y, rows, ye)
    sp = prefix + "shared_experts."
    return _rest(y + swiglu_clamped(x, P[sp + "w1.weight"], P[sp + "w2.weight"], P[sp + "w3.weight"],
                                    limit, 1.0, quant, bf16), bf16)


# =============================================================================================
# 3. Quantisation-aware simulation (spec 2.0, 2.13)
# =============================================================================================

def _pow2_ceil(v):
    """Exact 2^ceil(log2 v) for v > 0."""
    m, e = np.frexp(v)                                          # v = m 2^e, m in [0.5, 1)
    return np.ldexp(1.0, np.where(m == 0.5, e - 1, e))


def _round_minifloat(v, mbits, emin):
    """Round to the nearest value of a float format with `mbits` mantissa bits and minimum normal
    exponent `emin` (subnormals included), ties to even; range handling is left to the caller."""
    _, e = np.frexp(v)                                          # leading bit has exponent e-1
    quantum = np.ldexp(1.0, np.maximum(e - 1, emin) - mbits)
    return np.rint(v / quantum) * quantum


def _block_fake_quant(x, block, qmax, amax_floor, mbits, emin):
    x = np.asarray(x, F64)
    out = np.empty_like(x)
    for st in range(0, x.shape[-1], block):
        xb = x[..., st:st + block]
        amax = np.max(np.abs(xb), axis=-1, keepdims=True)
        s = _pow2_ceil(np.maximum(amax, amax_floor) / qmax)
        out[..., st:st + block] = _round_minifloat(np.clip(xb / s, -qmax, qmax), mbits, emin) * s
    return out


def fp8_act_quant(x, block=128):
    """spec 2.0: per-token blocks of `block` along the last dim (a ragged last block is its own
    block); s = 2^ceil(log2(max(amax, 1e-4)/448)); x -> E4M3_rne(clamp(x/s, +-448)) * s."""
    return _block_fake_quant(x, block, 448.0, 1e-4, mbits=3, emin=-6)


def fp8_kv_fake_quant(kv, nope_dim, block=64):
    """spec 2.3 / 2.13: FP8 fake-quant of dims [0, nope_dim) in blocks of 64; RoPE dims untouched."""
    out = np.array(kv, dtype=F64)
    out[..., :nope_dim] = fp8_act_quant(out[..., :nope_dim], block)
    return out


def hadamard(n):
    """spec 2.13: Sylvester-ordered Hadamard matrix H_n (natural order) times n^-1/2. [n, n]"""
    Hm = np.ones((1, 1), dtype=F64)
    while Hm.shape[0] < n:
        Hm = np.block([[Hm, Hm], [Hm, -Hm]])
    assert Hm.shape[0] == n, "hadamard size must be a power of two"
    return Hm / math.sqrt(n)


def fp4_fake_quant(x, block=32):
    """spec 2.13: blocks of 32 along the last dim; s = 2^ceil(log2(max(amax, 6*2^-126)/6));
    x -> E2M1(clamp(x/s, +-6)) * s, E2M1 grid {0,.5,1,1.5,2,3,4,6}, ties to even grid index."""
    return _block_fake_quant(x, block, 6.0, 6.0 * 2.0 ** -126, mbits=1, emin=0)


def linear(x, W, quant=False):
    """y = x W^T (W: [out, in]); quant: FP8 activation quant of x first (spec 2.0)."""
    return (fp8_act_quant(x) if quant else x) @ W.T


# =============================================================================================
# 4. Attention, blocks, model (spec 2.1-2.12)
# =============================================================================================

def layer_inv_freq(cfg, m):
    """spec 2.3: m == 0 -> rope_theta, no YaRN; m > 0 -> compress_rope_theta with YaRN."""
    dr = cfg["qk_rope_head_dim"]
    if m == 0:
        return rope_inv_freq(dr, cfg["rope_theta"], None)
    ys = cfg.get("rope_scaling")
    return rope_inv_freq(dr, cfg["compress_rope_theta"], ys if ys else None)


def compressor_entries(x, P, prefix, ratio, overlap, inv_freq, rope_dim, eps, bf16=False):
    """spec 2.5: a = x wkv^T, z = x wgate^T + ape[p mod m]; pool (compress); RMSNorm with
    `norm`; RoPE on the last rope_dim dims at position i*m. x: [S, D] -> [S//m, c]."""
    S = x.shape[0]
    pos = np.arange(S)
    a = x @ P[prefix + "wkv.weight"].T                          # [S, k*c]
    z = x @ P[prefix + "wgate.weight"].T + P[prefix + "ape"][pos % ratio]
    pooled = _rest(compress(a, z, ratio, overlap), bf16)
    ent = _rest(rms_norm(pooled, P[prefix + "norm.weight"], eps), bf16)              # [N, c]
    epos = np.arange(ent.shape[0]) * ratio
    ent[:, -rope_dim:] = _rest(apply_rope_interleaved(ent[:, -rope_dim:], epos, inv_freq), bf16)
    return ent


def lightning_indexer(x, q_lat, P, prefix, cfg, ratio, inv_freq, quant=False, bf16=False, scores_out=None):
    """spec 2.6. x: [S, D] attention input; q_lat: [S, r_q]. Returns list of S sets of entry ids
    (and, with `scores_out` a list, appends the [S, N] scores to it)."""
    S = x.shape[0]
    HI, dI, dr = cfg["index_n_heads"], cfg["index_head_dim"], cfg["qk_rope_head_dim"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    pos = np.arange(S)
    qI = _rest(linear(q_lat, P[prefix + "wq_b.weight"], quant), bf16).reshape(S, HI, dI)   # [S, H_I, d_I]
    qI[..., dI - dr:] = _rest(apply_rope_interleaved(qI[..., dI - dr:], pos, inv_freq), bf16)
    kI = compressor_entries(x, P, prefix + "compressor.", ratio, True, inv_freq, dr, eps, bf16)  # [N, d_I]
    if quant and bf16:
        qI, kI = indexer_fp4_bf16(qI).astype(F64), indexer_fp4_bf16(kI).astype(F64)
    elif quant:
        Hd = hadamard(dI)
        qI = fp4_fake_quant(qI @ Hd)
        kI = fp4_fake_quant(kI @ Hd)
    w = _rest(_rest(x @ P[prefix + "weights_proj.weight"].T, bf16) * (dI ** -0.5 * HI ** -0.5), bf16)  # [S, H_I]
    if bf16:  # the reference's bf16 scores: dots, weighted ReLUs and their head sum each rounded
        dots = _rest(np.einsum("shd,nd->shn", qI, kI), bf16)
        scores = _rest(_rest(w[:, :, None] * np.maximum(dots, 0.0), bf16).sum(axis=1), bf16)
    else:
        scores = indexer_scores(qI, kI, w)
    if scores_out is not None:
        scores_out.append(scores)
    return indexer_topk(scores, pos, ratio, cfg["index_topk"])


def attention(x, P, prefix, m, cfg, quant=False, bf16=False, scores_out=None):
    """spec 2.3-2.7: attention of one layer with compression ratio m. x: [S, D] -> [S, D]."""
    S = x.shape[0]
    H, d, dr = cfg["num_attention_heads"], cfg["head_dim"], cfg["qk_rope_head_dim"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    W = cfg["sliding_window"]
    pos = np.arange(S)
    inv = layer_inv_freq(cfg, m)
    # query path
    r = lambda v: _rest(v, bf16)
    q_lat = r(rms_norm(r(linear(x, P[prefix + "wq_a.weight"], quant)), P[prefix + "q_norm.weight"], eps))
    q = r(linear(q_lat, P[prefix + "wq_b.weight"], quant)).reshape(S, H, d)  # [S, H, d]
    q = r(rms_norm(q, None, eps))
    q[..., d - dr:] = r(apply_rope_interleaved(q[..., d - dr:], pos, inv))
    # kv path (single shared head, K = V)
    kv = r(rms_norm(r(linear(x, P[prefix + "wkv.weight"], quant)), P[prefix + "kv_norm.weight"], eps))
    kv[:, d - dr:] = r(apply_rope_interleaved(kv[:, d - dr:], pos, inv))       # [S, d]
    if quant:
        kv = fp8_kv_fake_quant(kv, d - dr)
    comp, selected = None, None
    if m > 0:
        overlap = (m == 4)
        comp = compressor_entries(x, P, prefix + "compressor.", m, overlap, inv, dr, eps, bf16)  # [S//m, d]
        if quant:
            comp = fp8_kv_fake_quant(comp, d - dr)
        if overlap:
            selected = lightning_indexer(x, q_lat, P, prefix + "indexer.", cfg, m, inv, quant, bf16, scores_out)
    kv_list = []
    for t in range(S):
        p = int(pos[t])
        parts = [kv[max(0, p - W + 1):p + 1]]                   # sliding window (spec 2.4)
        if m > 0:
            n = (p + 1) // m                                    # causal entries i < (p+1)//m
            idx = sorted(selected[t]) if selected is not None else list(range(n))
            parts.append(comp[np.asarray(idx, dtype=np.int64)].reshape(-1, d))
        kv_list.append(np.concatenate(parts, axis=0))
    o = r(attention_with_sink(q, kv_list, P[prefix + "attn_sink"], d ** -0.5))   # [S, H, d]
    o[..., d - dr:] = r(apply_rope_interleaved(o[..., d - dr:], pos, inv, inverse=True))
    return grouped_out_proj(o, P[prefix + "wo_a.weight"], P[prefix + "wo_b.weight"],
                            cfg["o_groups"], quant, bf16)


def block(X, token_ids, P, prefix, m, hash_layer, cfg, quant=False, bf16=False, scores_out=None):
    """spec 2.7b: one decoder block on hyper-connection streams X: [S, n_hc, D] -> same shape."""
    eps = cfg.get("rms_norm_eps", 1e-6)
    hc_eps = cfg.get("hc_eps", 1e-6)
    iters = cfg.get("hc_sinkhorn_iters", 20)
    r = lambda v: _rest(v, bf16)
    y, post, C = hc_pre(X, P[prefix + "hc_attn_fn"], P[prefix + "hc_attn_base"],
                        P[prefix + "hc_attn_scale"], hc_eps, eps, iters)
    a = attention(r(rms_norm(r(y), P[prefix + "attn_norm.weight"], eps)), P, prefix + "attn.", m, cfg, quant,
                  bf16, scores_out)
    X = r(hc_post(a, X, post, C))
    y, post, C = hc_pre(X, P[prefix + "hc_ffn_fn"], P[prefix + "hc_ffn_base"],
                        P[prefix + "hc_ffn_scale"], hc_eps, eps, iters)
    f = moe(r(rms_norm(r(y), P[prefix + "ffn_norm.weight"], eps)), token_ids, P, prefix + "ffn.", cfg,
            hash_layer, quant, bf16)
    return r(hc_post(f, X, post, C))


def forward(config, params, token_ids, quant_sim=False, bf16=False, scores_out=None):
    """Full DeepSeek-V4 forward (spec 2.1-2.12) in float64.

    config: HF-style root config dict (spec 1.1 keys). params: published tensor names -> already
    dequantised float arrays ([out, in]; `tid2eid` integer), e.g. from `dequantize_published`.
    token_ids: [batch, seq] int; positions are 0..seq-1.
    quant_sim: simulate FP8 activation quant (inputs of wq_a, wq_b, wkv, wo_b, indexer.wq_b,
    shared and routed w1/w2/w3, e_proj, h_proj), FP8 KV fake-quant (window kv and main compressed
    entries, non-RoPE dims) and Hadamard + FP4 fake-quant of indexer q and keys.

    bf16: round to bf16 where the reference keeps bf16 (see the module docstring); scores_out: a list
    that collects every CSA layer's indexer scores [seq, N] (per sequence, in layer order).

    Returns {"logits": [batch, seq, vocab], "mtp_logits": [batch, seq, vocab] or None}.
    MTP (spec 2.12, DeepSeek-V3 alignment): position t combines the main model's final streams at
    t (after the last block, before hc_head) with embed(token_{t+1}). For the LAST position
    there is no next token: token id 0 is used as the placeholder, so mtp_logits[:, -1] is a
    convention only. mtp_logits is None when the params contain no `mtp.0.e_proj.weight`.
    """
    cfg = config
    P = {k: (np.asarray(v) if k.endswith("tid2eid") else np.asarray(v, dtype=F64))
         for k, v in params.items()}
    ids = np.asarray(token_ids, dtype=np.int64)
    B, S = ids.shape
    L = cfg["num_hidden_layers"]
    n_hc = cfg.get("hc_mult", 4)
    eps = cfg.get("rms_norm_eps", 1e-6)
    hc_eps = cfg.get("hc_eps", 1e-6)
    ratios = list(cfg["compress_ratios"])
    n_hash = cfg.get("num_hash_layers", 0)
    embed, head = P["embed.weight"], P["head.weight"]
    has_mtp = "mtp.0.e_proj.weight" in P
    V = head.shape[0]
    logits = np.zeros((B, S, V), dtype=F64)
    mtp_logits = np.zeros((B, S, V), dtype=F64) if has_mtp else None
    for b in range(B):
        tok = ids[b]
        X = np.repeat(embed[tok][:, None, :], n_hc, axis=1)     # [S, n_hc, D] (spec 2.1)
        for layer in range(L):
            X = block(X, tok, P, f"layers.{layer}.", ratios[layer], layer < n_hash, cfg, quant_sim, bf16, scores_out)
        h = _rest(hc_head(X, P["hc_head_fn"], P["hc_head_base"], P["hc_head_scale"], hc_eps, eps), bf16)
        logits[b] = _rest(rms_norm(h, P["norm.weight"], eps), bf16) @ head.T
        if has_mtp:                                             # spec 2.12
            mp = "mtp.0."
            nxt = np.concatenate([tok[1:], np.zeros(1, dtype=np.int64)])   # last: placeholder 0
            r = lambda v: _rest(v, bf16)
            e = r(rms_norm(embed[nxt], P[mp + "enorm.weight"], eps))
            X0 = r(r(linear(e, P[mp + "e_proj.weight"], quant_sim))[:, None, :]
                   + r(linear(r(rms_norm(X, P[mp + "hnorm.weight"], eps)), P[mp + "h_proj.weight"], quant_sim)))
            m_mtp = ratios[L] if len(ratios) > L else 0
            X1 = block(X0, nxt, P, mp, m_mtp, False, cfg, quant_sim, bf16, None)
            hm = r(hc_head(X1, P[mp + "hc_head_fn"], P[mp + "hc_head_base"], P[mp + "hc_head_scale"],
                           hc_eps, eps))
            mtp_logits[b] = r(rms_norm(hm, P[mp + "norm.weight"], eps)) @ head.T
    return {"logits": logits, "mtp_logits": mtp_logits}


# =============================================================================================
# 5. Bit-level emulation of the quantisation steps at bf16 round-off (spec 2.0, 2.8, 2.13)
# =============================================================================================
# Section 3 computes the same rounding in float64; the functions below add what a bit-exact
# comparison with a bf16 implementation needs: bf16 rounding, the float32 Hadamard transform of
# the reference kernel, and the byte encodings of the FP8 / FP4 cache rows. Every encoder builds
# the bits from sign, exponent and mantissa fields (no ml_dtypes casts).

def round_bf16(x):
    """float32 -> nearest bfloat16 value (ties to even on the 16 dropped bits), as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def bf16_bytes(x):
    """bf16 values (float32 arrays already on the bf16 grid) -> little-endian bytes [..., 2n]."""
    hi = (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.stack([hi & 0xFF, hi >> 8], axis=-1).astype(np.uint8).reshape(*hi.shape[:-1], -1)


def block_scales(x, block, qmax, amax_floor):
    """spec 2.13: per block of the last dim (a ragged last block is its own block), the power of two
    2^ceil(log2(max(amax, floor)/qmax)). x: [..., n] -> float64 [..., ceil(n/block)]."""
    x = np.asarray(x, F64)
    starts = range(0, x.shape[-1], block)
    amax = np.stack([np.abs(x[..., s:s + block]).max(axis=-1) for s in starts], axis=-1)
    return _pow2_ceil(np.maximum(amax, amax_floor) / qmax)


def e4m3_byte(v):
    """Values on the E4M3 grid (|v| <= 448) -> FP8 'fn' bytes: sign, 4 exponent bits (bias 7), 3 mantissa
    bits; exponent field 0 = subnormal (m * 2^-9)."""
    v = np.asarray(v, F64)
    mag = np.abs(v)
    _, e = np.frexp(mag)                                        # mag = f 2^e, f in [0.5, 1)
    field = np.clip(e - 1 + 7, 0, 15)                           # biased exponent, 0 for subnormals
    quantum = np.exp2(np.maximum(field, 1) - 7.0 - 3)
    mant = np.rint(mag / quantum).astype(np.int64) - np.where(field > 0, 8, 0)
    field = np.where(mag == 0, 0, field)
    mant = np.where(mag == 0, 0, mant)
    assert np.all((mant >= 0) & (mant < 8)) and np.all(mant * quantum + (field > 0) * 8 * quantum == mag)
    return ((np.signbit(v).astype(np.int64) << 7) | (field << 3) | mant).astype(np.uint8)


def e2m1_code(v):
    """Values on the E2M1 grid (|v| <= 6) -> 4-bit codes (bit 3 = sign, then the grid index)."""
    v = np.asarray(v, F64)
    grid = FP4_E2M1_TABLE[:8]
    idx = np.argmin(np.abs(np.abs(v)[..., None] - grid), axis=-1)
    assert np.all(grid[idx] == np.abs(v))
    return ((np.signbit(v).astype(np.int64) << 3) | idx).astype(np.uint8)


def e8m0_byte(s):
    """Powers of two -> UE8M0 bytes (biased exponent 127)."""
    m, e = np.frexp(np.asarray(s, F64))
    assert np.all(m == 0.5)
    return (e - 1 + 127).astype(np.uint8)


def pack_kv_row(kv, rope_dim, item_bytes=2, block=64):
    """spec 2.8 FlashMLA layout of one bf16 KV vector: E4M3 codes of the non-RoPE dims, one UE8M0 scale
    per 64 of them, zero pad to the bf16 alignment, the RoPE dims as bf16 bytes.
    kv: [..., d] bf16 values (float32) whose non-RoPE dims are FP8-fake-quantised -> uint8 [..., bytes]."""
    kv = np.asarray(kv, np.float32)
    nope = kv[..., :-rope_dim]
    s = block_scales(nope, block, 448.0, 1e-4)                  # [..., nope/64]
    codes = e4m3_byte(nope / np.repeat(s, block, axis=-1))
    head = np.concatenate([codes, e8m0_byte(s)], axis=-1)
    pad = np.zeros((*kv.shape[:-1], -head.shape[-1] % item_bytes), np.uint8)
    return np.concatenate([head, pad, bf16_bytes(kv[..., -rope_dim:])], axis=-1)


def pack_index_key(k, block=32):
    """Packed indexer key: E2M1 codes two per byte (low nibble = even dim), then one UE8M0 scale per 32.
    k: [..., d_I] FP4-fake-quantised values -> uint8 [..., d_I/2 + d_I/32]."""
    k = np.asarray(k, np.float32)
    s = block_scales(k, block, 6.0, 6.0 * 2.0 ** -126)
    codes = e2m1_code(k / np.repeat(s, block, axis=-1))
    return np.concatenate([codes[..., 0::2] | (codes[..., 1::2] << 4), e8m0_byte(s)], axis=-1)


def hadamard_rotate_bf16(x):
    """spec 2.6 / 2.13, as the reference's transform kernel: x (bf16 values) times the +-1 Sylvester
    matrix in float32, times float32(n^-1/2), rounded to bf16. x: [..., n] -> float32 [..., n]."""
    n = x.shape[-1]
    pm = hadamard(n) * math.sqrt(n)                             # +-1 entries
    rotated = (np.asarray(x, F64) @ pm).astype(np.float32)      # exact for the tests' inputs
    return round_bf16(rotated * np.float32(n ** -0.5))


def indexer_fp4_bf16(x):
    """Indexer q / k simulation at bf16: Hadamard rotation, then FP4 fake-quant rounded to bf16."""
    return round_bf16(fp4_fake_quant(hadamard_rotate_bf16(x)).astype(np.float32))
