"""Causal self-attention: RoPE, the attention core with grouped-query heads, and the whole layer.

Legend: B batch, T time, C channels, H query heads, Hkv key/value heads, D head size (C = H*D),
g = H / Hkv query heads sharing one key/value head (g = 1: multi-head; Hkv = 1: multi-query).
Query head h uses key/value head h // g (the layout of Hugging Face's `repeat_kv`).
"""

import math

from minimoe import backend
from minimoe.ops.linear import linear_backward, linear_forward

# ---------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021, RoFormer), "rotate halves" layout (GPT-NeoX/Llama):
# the head vector is split into halves x = [x1, x2] and pair (x1_i, x2_i) is rotated by the
# angle pos * theta^(-2i/D), i = 0 .. D/2 - 1.
# ---------------------------------------------------------------------------------------------


def rope_tables(T, D, theta=10000.0, offset=0, xp=None, dtype="float32"):
    """cos, sin tables (T, D/2) for positions offset .. offset+T-1."""
    xp = xp or backend.get_xp()
    if D % 2:
        raise ValueError(f"RoPE needs an even head size, got {D}")
    inv_freq = 1.0 / (theta ** (xp.arange(0, D // 2, dtype=xp.float64) * 2.0 / D))
    pos = xp.arange(offset, offset + T, dtype=xp.float64)
    ang = pos[:, None] * inv_freq[None, :]
    return xp.cos(ang).astype(dtype), xp.sin(ang).astype(dtype)


def rope_forward(x, cos, sin):
    """x (B, H, T, D), cos/sin (T, D/2) -> (B, H, T, D).
    y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin."""
    xp = backend.xp_of(x)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    y = xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y, (cos, sin)


def rope_backward(dy, cache):
    """dy (B, H, T, D) -> dx. A rotation's inverse is its transpose: rotate by -angle.
    dx1 = dy1 cos + dy2 sin,   dx2 = dy2 cos - dy1 sin."""
    cos, sin = cache
    xp = backend.xp_of(dy)
    h = dy.shape[-1] // 2
    d1, d2 = dy[..., :h], dy[..., h:]
    return xp.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1)


# ---------------------------------------------------------------------------------------------
# Attention core: softmax(q k^T / sqrt(D) + causal mask) v   (Vaswani et al. 2017, eq. 1)
# ---------------------------------------------------------------------------------------------


def causal_attention_forward(q, k, v):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with Tk >= Tq -> y (B, H, Tq, D).

    The Tq queries are the LAST Tq positions of the Tk keys (Tq == Tk in training; Tq < Tk when
    generating with a key/value cache): query i sits at position Tk - Tq + i and may attend to
    keys 0 .. Tk - Tq + i.
    Grouped-query attention without copying k and v: the g query heads of a group are stacked
    along time, q -> (B, Hkv, g*Tq, D), so one batched matmul per key/value head serves them all.
    """
    xp = backend.xp_of(q)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = 1.0 / math.sqrt(D)
    qg = q.reshape(B, Hkv, g * Tq, D)
    s = qg @ k.swapaxes(-1, -2)  # (B, Hkv, g*Tq, Tk) attention scores
    s *= scale
    # causal mask: -inf where key position > query position; broadcast over (B, Hkv, g)
    allowed = xp.arange(Tk)[None, :] <= (xp.arange(Tq) + (Tk - Tq))[:, None]  # (Tq, Tk)
    s.reshape(B, Hkv, g, Tq, Tk)[...] += xp.where(allowed, 0.0, -xp.inf).astype(s.dtype)
    # softmax over keys, in place: p = exp(s - max) / sum
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    p = s
    y = (p @ v).reshape(B, H, Tq, D)
    return y, (qg, k, v, p, scale)


def causal_attention_backward(dy, cache):
    """dy (B, H, Tq, D) -> dq (B, H, Tq, D), dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, D).

    y = p v            =>  dv = p^T dy,   dp = dy v^T
    p = softmax(s)     =>  ds = p * (dp - sum_keys(dp * p))   (masked entries have p = 0, ds = 0)
    s = q k^T * scale  =>  dq = ds k * scale,  dk = ds^T q * scale
    Because the g heads of a group were stacked along time, the matmuls for dk and dv sum over
    the group automatically (a key/value head's gradient is the sum over the heads that read it).
    """
    qg, k, v, p, scale = cache
    B, H, Tq, D = dy.shape
    Hkv = k.shape[1]
    dyg = dy.reshape(B, Hkv, -1, D)
    dv = p.swapaxes(-1, -2) @ dyg
    dp = dyg @ v.swapaxes(-1, -2)
    dp -= (dp * p).sum(axis=-1, keepdims=True)
    ds = p * dp
    ds *= scale
    dq = (ds @ k).reshape(B, H, Tq, D)
    dk = ds.swapaxes(-1, -2) @ qg
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The whole layer: x -> qkv projection -> [RoPE] -> attention -> output projection
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the tokens generated so far, per layer: (B, Hkv, T_max, D) each.

    `pos` is how many positions are filled. Only for generation (no backward through it).
    """

    def __init__(self, n_layer, B, n_kv_head, T_max, D, xp=None, dtype="float32"):
        xp = xp or backend.get_xp()
        self.k = [xp.zeros((B, n_kv_head, T_max, D), dtype=dtype) for _ in range(n_layer)]
        self.v = [xp.zeros((B, n_kv_head, T_max, D), dtype=dtype) for _ in range(n_layer)]
        self.T_max = T_max
        self.pos = 0


def self_attention_forward(x, wqkv, bqkv, wo, bo, n_head, n_kv_head, rope=None, kv=None):
    """x (B, T, C) -> y (B, T, C). Causal multi-head self-attention with grouped-query heads.

    wqkv (C, (H + 2 Hkv) D) holds the query, key and value projections side by side [q | k | v];
    bqkv ((H + 2 Hkv) D,) or None; wo (H D, C); bo (C,) or None.
    rope: None, or (cos, sin) tables (T, D/2) for these T positions.
    kv: None, or (KVCache, layer) to append this call's keys/values and attend over all cached
        positions (generation; the backward is not available then).
    """
    B, T, C = x.shape
    H, Hkv = n_head, n_kv_head
    D = wo.shape[0] // H
    qkv, qkv_cache = linear_forward(x, wqkv, bqkv)  # (B, T, (H + 2Hkv) D)
    # split and move heads forward: (B, T, n, D) -> (B, n, T, D)
    q = qkv[..., : H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = qkv[..., H * D : (H + Hkv) * D].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
    v = qkv[..., (H + Hkv) * D :].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
    q_rope = k_rope = None
    if rope is not None:
        q, q_rope = rope_forward(q, *rope)
        k, k_rope = rope_forward(k, *rope)
    if kv is not None:
        cache_obj, layer = kv
        p0 = cache_obj.pos
        if p0 + T > cache_obj.T_max:
            raise ValueError(f"KV cache holds {cache_obj.T_max} positions; cannot add {T} at position {p0}")
        cache_obj.k[layer][:, :, p0 : p0 + T] = k
        cache_obj.v[layer][:, :, p0 : p0 + T] = v
        k = cache_obj.k[layer][:, :, : p0 + T]
        v = cache_obj.v[layer][:, :, : p0 + T]
    a, att_cache = causal_attention_forward(q, k, v)  # (B, H, T, D)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, H * D)
    y, out_cache = linear_forward(a, wo, bo)
    return y, (qkv_cache, q_rope, k_rope, att_cache, out_cache, (B, T, H, Hkv, D))


def self_attention_backward(dy, cache):
    """dy (B, T, C) -> dx (B, T, C), dwqkv, dbqkv (or None), dwo, dbo (or None)."""
    xp = backend.xp_of(dy)
    qkv_cache, q_rope, k_rope, att_cache, out_cache, (B, T, H, Hkv, D) = cache
    da, dwo, dbo = linear_backward(dy, out_cache)
    da = da.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dq, dk, dv = causal_attention_backward(da, att_cache)
    if q_rope is not None:
        dq = rope_backward(dq, q_rope)
        dk = rope_backward(dk, k_rope)
    # back to (B, T, n*D) and side by side [dq | dk | dv], the layout of wqkv's output
    dqkv = xp.concatenate(
        [
            dq.transpose(0, 2, 1, 3).reshape(B, T, H * D),
            dk.transpose(0, 2, 1, 3).reshape(B, T, Hkv * D),
            dv.transpose(0, 2, 1, 3).reshape(B, T, Hkv * D),
        ],
        axis=-1,
    )
    dx, dwqkv, dbqkv = linear_backward(dqkv, qkv_cache)
    return dx, dwqkv, dbqkv, dwo, dbo
