"""Multi-head Latent Attention (MLA): DeepSeek-V2 (2024) sec. 2.1, eqs. 37-47; DeepSeek-V3 sec. 2.1.1.

Legend: B batch, T time (Tq queries, Tk keys), C channels, H heads, and MLA's own sizes
    rq  = q_lora_rank        the query latent (0: the query is a direct projection x W_q)
    rkv = kv_lora_rank       the key/value latent c_kv, the only per-head-free thing cached
    dn  = qk_nope_head_dim   the per-head query/key part that carries no position
    dr  = qk_rope_head_dim   the decoupled RoPE part; ONE RoPE key per token, shared by all heads
    dv  = v_head_dim

Forward, x (B, T, C) -> y (B, T, C):
    c_q   = RMSNorm(x W_dq)                 (B, T, rq)               eq. 37
    q     = c_q W_uq   (or x W_q)           (B, T, H (dn + dr)),  per head [q_nope | q_pe]
    q_pe  = RoPE(q_pe)                                               eqs. 38-40
    [a | k_pe] = x W_dkv                    (B, T, rkv + dr)         eqs. 41, 43
    c_kv  = RMSNorm(a),  k_pe = RoPE(k_pe)  (B, T, rkv), (B, T, dr)  <- the KV cache holds these
    [k_nope | v] = c_kv W_ukv               (B, T, H (dn + dv)),  per head             eqs. 42, 45
    k_h   = [k_nope_h | k_pe]               the same k_pe for every head                eq. 44
    s_h   = (q_nope_h k_nope_h^T + q_pe_h k_pe^T) / sqrt(dn + dr) + causal mask
    o_h   = softmax(s_h) v_h                (B, H, Tq, dv)                              eq. 46
    y     = [o_1 | ... | o_H] W_o           W_o (H dv, C)                                eq. 47
(Weights are stored (in, out); each per-head block is laid out [nope | rope] or [k_nope | v], the
layout of transformers' DeepseekV3Attention, so its weights import by a transpose.)

Backward, the forward in reverse (p = softmax(s), scale = 1 / sqrt(dn + dr)):
    do = dy W_o^T,  dW_o = o^T dy
    dv_h = p_h^T do_h,  dp_h = do_h v_h^T,  ds_h = p_h * (dp_h - rowsum(dp_h * p_h)) * scale
    dq_nope_h = ds_h k_nope_h,   dk_nope_h = ds_h^T q_nope_h
    dq_pe_h   = ds_h k_pe,       dk_pe = sum_h ds_h^T q_pe_h   (shared by the heads: their sum)
    dW_ukv = c_kv^T [dk_nope | dv],   dc_kv = [dk_nope | dv] W_ukv^T
    then back through RoPE (a rotation by -angle) and RMSNorm into [da | dk_pe], W_dkv and x; the
    query path likewise; dx = (key/value path) + (query path).

Decoding with absorbed weights (the speed trick; `mla_attend_expanded` is its plain twin): with
W_ukv's head-h blocks W_uk_h (rkv, dn) and W_uv_h (rkv, dv), k_nope_h = c_kv W_uk_h and
v_h = c_kv W_uv_h, so
    q_nope_h k_nope_h^T = (q_nope_h W_uk_h^T) c_kv^T      and      p_h v_h = (p_h c_kv) W_uv_h:
each step attends over the cached latents directly, never expanding them into per-head keys.

KV cache per token per layer (numbers):  MHA 2 H D,  GQA 2 Hkv D,  MQA 2 D,  MLA rkv + dr.
DeepSeek-V3 (H = 128, D = 128, rkv = 512, dr = 64): 32768 / 2048 (Hkv = 8) / 256 / 576.

RoPE layout: rotate-halves (ops/attention.py). transformers' `rope_interleave=True` (DeepSeek's
own checkpoints) rotates pairs (x0, x1), (x2, x3), ... and returns [rotated evens | rotated
odds], which is exactly rotate-halves applied to x[perm] with perm = `rope_interleave_perm(dr)`
= [0, 2, 4, ..., 1, 3, 5, ...]. So importing such weights permutes the dr RoPE output columns of
W_q / W_uq (per head) and of W_dkv by perm (exporting: by argsort(perm)); no other change.
"""

import math
from typing import Any, NamedTuple, Optional

from minimoe import backend
from minimoe.ops import linear, norm
from minimoe.ops.attention import rope_backward, rope_forward


def rope_interleave_perm(d_rope):
    """[0, 2, 4, ..., 1, 3, 5, ...]: interleaved-pairs RoPE of x == rotate-halves RoPE of x[perm]."""
    return list(range(0, d_rope, 2)) + list(range(1, d_rope, 2))


class MLAWeights(NamedTuple):
    """One MLA layer's weights. Either wq (direct query) or wq_a, q_a_norm, wq_b (low rank)."""

    wq: Optional[Any]  # (C, H (dn + dr)), or None
    wq_a: Optional[Any]  # (C, rq) W_dq, or None
    q_a_norm: Optional[Any]  # (rq,) RMSNorm gain of c_q, or None
    wq_b: Optional[Any]  # (rq, H (dn + dr)) W_uq, or None
    wkv_a: Any  # (C, rkv + dr) W_dkv: [latent | RoPE key]
    kv_a_norm: Any  # (rkv,) RMSNorm gain of c_kv
    wkv_b: Any  # (rkv, H (dn + dv)) W_ukv, per head [k_nope | v]
    wo: Any  # (H dv, C)


class LatentKVCache:
    """MLA's generation cache: per layer the normalised latent c_kv (B, T_max, rkv) and the
    rotated RoPE key k_pe (B, T_max, dr); rkv + dr numbers per token per layer, nothing per head.
    `pos` is how many positions are filled (the model advances it). No backward through it."""

    def __init__(self, n_layer, B, T_max, kv_lora_rank, d_rope, xp=None, dtype="float32"):
        xp = xp or backend.get_xp()
        self.c_kv = [xp.zeros((B, T_max, kv_lora_rank), dtype=dtype) for _ in range(n_layer)]
        self.k_pe = [xp.zeros((B, T_max, d_rope), dtype=dtype) for _ in range(n_layer)]
        self.T_max = T_max
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.c_kv + self.k_pe)

    def append(self, layer, c_kv, k_pe):
        """Write this call's (B, T, rkv) latents and (B, T, dr) RoPE keys at positions pos..pos+T-1;
        -> every cached position's (B, pos + T, rkv), (B, pos + T, dr) (views)."""
        p0, T = self.pos, c_kv.shape[1]
        if p0 + T > self.T_max:
            raise ValueError(f"KV cache holds {self.T_max} positions; cannot add {T} at position {p0}")
        self.c_kv[layer][:, p0 : p0 + T] = c_kv
        self.k_pe[layer][:, p0 : p0 + T] = k_pe
        return self.c_kv[layer][:, : p0 + T], self.k_pe[layer][:, : p0 + T]


def _causal_softmax(s):
    """Scores (B, H, Tq, Tk) -> probabilities, in place; query i sits at position Tk - Tq + i and
    sees keys 0 .. Tk - Tq + i (the last Tq of Tk positions, as in ops/attention.py)."""
    xp = backend.xp_of(s)
    Tq, Tk = s.shape[-2:]
    future = xp.arange(Tk)[None, :] > (xp.arange(Tq) + (Tk - Tq))[:, None]
    s += xp.where(future, -xp.inf, 0.0).astype(s.dtype)  # (Tq, Tk), broadcast over (B, H)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


# ---------------------------------------------------------------------------------------------
# The attention core: per-head no-position keys plus one shared RoPE key (eqs. 44-46)
# ---------------------------------------------------------------------------------------------


class MLACoreCache(NamedTuple):
    q_nope: Any  # (B, H, Tq, dn)
    q_pe: Any  # (B, H, Tq, dr) rotated
    k_nope: Any  # (B, H, Tk, dn)
    k_pe: Any  # (B, 1, Tk, dr) rotated, shared by the heads
    v: Any  # (B, H, Tk, dv)
    probs: Any  # (B, H, Tq, Tk)
    scale: float  # 1 / sqrt(dn + dr)


def mla_attend_forward(q_nope, q_pe, k_nope, k_pe, v):
    """q_nope (B, H, Tq, dn), q_pe (B, H, Tq, dr), k_nope (B, H, Tk, dn), k_pe (B, 1, Tk, dr),
    v (B, H, Tk, dv) -> o (B, H, Tq, dv).
        o_h = softmax((q_nope_h k_nope_h^T + q_pe_h k_pe^T) / sqrt(dn + dr) + mask) v_h
    which is attention with k_h = [k_nope_h | k_pe], without copying k_pe into every head."""
    scale = 1.0 / math.sqrt(q_nope.shape[-1] + q_pe.shape[-1])
    s = q_nope @ k_nope.swapaxes(-1, -2)
    s += q_pe @ k_pe.swapaxes(-1, -2)  # (B, H, Tq, dr) @ (B, 1, dr, Tk): broadcast over heads
    s *= scale
    p = _causal_softmax(s)
    return p @ v, MLACoreCache(q_nope, q_pe, k_nope, k_pe, v, p, scale)


def mla_attend_backward(do, cache):
    """do (B, H, Tq, dv) -> dq_nope, dq_pe, dk_nope, dk_pe (B, 1, Tk, dr), dv (see the module doc)."""
    c = cache
    p = c.probs
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ c.v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward (0 where masked)
    ds *= c.scale
    dq_nope, dq_pe = ds @ c.k_nope, ds @ c.k_pe
    dk_nope = ds.swapaxes(-1, -2) @ c.q_nope
    dk_pe = (ds.swapaxes(-1, -2) @ c.q_pe).sum(axis=1, keepdims=True)  # every head read k_pe
    return dq_nope, dq_pe, dk_nope, dk_pe, dv


def _heads(a, H):
    """(B, T, H d) -> (B, H, T, d), contiguous."""
    B, T, _ = a.shape
    return backend.xp_of(a).ascontiguousarray(a.reshape(B, T, H, -1).transpose(0, 2, 1, 3))


def _expand(c_kv, wkv_b, H, dn):
    """c_kv (B, Tk, rkv) -> k_nope (B, H, Tk, dn), v (B, H, Tk, dv), linear cache  (eqs. 42, 45)."""
    kv, lin = linear.linear_forward(c_kv, wkv_b)
    kv = _heads(kv, H)
    return kv[..., :dn], kv[..., dn:], lin


def mla_attend_expanded(q_nope, q_pe, c_kv, k_pe, wkv_b):
    """The plain twin of `mla_attend_absorbed`: expand the latents c_kv (B, Tk, rkv) into per-head
    keys and values, then attend. k_pe (B, Tk, dr) -> o (B, H, Tq, dv)."""
    k_nope, v, _ = _expand(c_kv, wkv_b, q_nope.shape[1], q_nope.shape[-1])
    return mla_attend_forward(q_nope, q_pe, k_nope, k_pe[:, None], v)[0]


def mla_attend_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b):
    """Attention over the cached latents with W_uk absorbed into the query and W_uv applied after
    the weighted sum (module doc); forward only (generation). Same shapes as `mla_attend_expanded`."""
    xp = backend.xp_of(q_nope)
    H, dn = q_nope.shape[1], q_nope.shape[-1]
    w = wkv_b.reshape(wkv_b.shape[0], H, -1)  # (rkv, H, dn + dv)
    w_uk, w_uv = w[..., :dn], w[..., dn:]
    q_lat = xp.einsum("bhqd,rhd->bhqr", q_nope, w_uk)  # (B, H, Tq, rkv): q_nope_h W_uk_h^T
    c = c_kv[:, None]  # (B, 1, Tk, rkv): one latent per position, read by every head
    s = q_lat @ c.swapaxes(-1, -2)
    s += q_pe @ k_pe[:, None].swapaxes(-1, -2)
    s *= 1.0 / math.sqrt(dn + q_pe.shape[-1])
    p = _causal_softmax(s)
    return xp.einsum("bhqr,rhd->bhqd", p @ c, w_uv)  # (p_h c_kv) W_uv_h


# ---------------------------------------------------------------------------------------------
# The whole layer
# ---------------------------------------------------------------------------------------------


class MLACache(NamedTuple):
    """What `mla_backward` needs from `mla_forward`."""

    q_a: Optional[tuple]  # linear cache of x W_dq (None for a direct query)
    q_norm: Optional[tuple]  # RMSNorm cache of c_q (None for a direct query)
    q_b: tuple  # linear cache of c_q W_uq, or of x W_q
    q_rope: tuple  # RoPE cache of q_pe
    kv_a: tuple  # linear cache of x W_dkv
    kv_norm: tuple  # RMSNorm cache of c_kv
    k_rope: tuple  # RoPE cache of k_pe
    kv_b: tuple  # linear cache of c_kv W_ukv
    core: MLACoreCache
    out: tuple  # linear cache of o W_o


def mla_forward(x, w: MLAWeights, n_head, rope, eps=1e-6, kv=None):
    """x (B, T, C) -> y (B, T, C), MLACache. The module doc's forward, plain (k, v expanded).

    rope: (cos, sin) tables (T, dr/2) for these T positions. eps: the latent RMSNorms' epsilon.
    kv: None, or (LatentKVCache, layer): append this call's c_kv and k_pe and attend over every
        cached position with absorbed weights (generation; the cache returned is then None).
    """
    H = n_head
    B, T, _ = x.shape
    dv = w.wo.shape[0] // H
    dn = w.wkv_b.shape[1] // H - dv
    rkv = w.kv_a_norm.shape[0]
    # queries (eqs. 37-40)
    q_a = q_norm = None
    if w.wq is None:
        c_q, q_a = linear.linear_forward(x, w.wq_a)
        c_q, q_norm = norm.rmsnorm_forward(c_q, w.q_a_norm, eps)
        q, q_b = linear.linear_forward(c_q, w.wq_b)
    else:
        q, q_b = linear.linear_forward(x, w.wq)
    q = _heads(q, H)  # (B, H, T, dn + dr)
    q_nope = q[..., :dn]
    q_pe, q_rope = rope_forward(q[..., dn:], *rope)
    # the latent and the shared RoPE key (eqs. 41, 43)
    a, kv_a = linear.linear_forward(x, w.wkv_a)  # (B, T, rkv + dr)
    c_kv, kv_norm = norm.rmsnorm_forward(a[..., :rkv], w.kv_a_norm, eps)
    k_pe, k_rope = rope_forward(a[:, None, :, rkv:], *rope)  # (B, 1, T, dr)
    if kv is None:
        k_nope, v, kv_b = _expand(c_kv, w.wkv_b, H, dn)  # eqs. 42, 45
        o, core = mla_attend_forward(q_nope, q_pe, k_nope, k_pe, v)
    else:
        cache_obj, layer = kv
        c_all, k_all = cache_obj.append(layer, c_kv, k_pe[:, 0])
        o, core, kv_b = mla_attend_absorbed(q_nope, q_pe, c_all, k_all, w.wkv_b), None, None
    o = o.transpose(0, 2, 1, 3).reshape(B, T, H * dv)
    y, out = linear.linear_forward(o, w.wo)
    if kv is not None:
        return y, None
    return y, MLACache(q_a, q_norm, q_b, q_rope, kv_a, kv_norm, k_rope, kv_b, core, out)


def mla_backward(dy, cache: MLACache):
    """dy (B, T, C) -> dx (B, T, C), MLAWeights of gradients (None where the weight is absent)."""
    xp = backend.xp_of(dy)
    B, T, _ = dy.shape
    H = cache.core.q_nope.shape[1]
    do, dwo, _ = linear.linear_backward(dy, cache.out)
    do = do.reshape(B, T, H, -1).transpose(0, 2, 1, 3)  # (B, H, T, dv)
    dq_nope, dq_pe, dk_nope, dk_pe, dv = mla_attend_backward(do, cache.core)
    # keys/values: [dk_nope | dv] per head -> W_ukv and the latent; dk_pe -> the RoPE key
    dkv = xp.concatenate([dk_nope, dv], axis=-1).transpose(0, 2, 1, 3).reshape(B, T, -1)
    dc_kv, dwkv_b, _ = linear.linear_backward(dkv, cache.kv_b)
    da_lat, dkv_a_norm = norm.rmsnorm_backward(dc_kv, cache.kv_norm)
    da_pe = rope_backward(dk_pe, cache.k_rope)[:, 0]  # (B, T, dr)
    dx, dwkv_a, _ = linear.linear_backward(xp.concatenate([da_lat, da_pe], axis=-1), cache.kv_a)
    # queries: [dq_nope | dq_pe] per head -> W_q, or W_uq, the query norm and W_dq
    dq_pe = rope_backward(dq_pe, cache.q_rope)
    dq = xp.concatenate([dq_nope, dq_pe], axis=-1).transpose(0, 2, 1, 3).reshape(B, T, -1)
    dwq = dwq_a = dq_a_norm = None
    if cache.q_a is None:
        dxq, dwq, _ = linear.linear_backward(dq, cache.q_b)
        dwq_b = None
    else:
        dc_q, dwq_b, _ = linear.linear_backward(dq, cache.q_b)
        dc_q, dq_a_norm = norm.rmsnorm_backward(dc_q, cache.q_norm)
        dxq, dwq_a, _ = linear.linear_backward(dc_q, cache.q_a)
    dx += dxq
    return dx, MLAWeights(dwq, dwq_a, dq_a_norm, dwq_b, dwkv_a, dkv_a_norm, dwkv_b, dwo)
