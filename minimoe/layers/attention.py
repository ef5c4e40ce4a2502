"""The attention block: x -> qkv projection -> [QK-norm] -> [RoPE] -> causal attention -> output projection.

    q, k, v = split(x Wqkv + bqkv)          (B, T, C) -> (B, H, T, D), (B, Hkv, T, D) twice
    q, k    = RMSNorm(q), RMSNorm(k)        with QK-norm: over the whole projection (OLMoE) or
                                            over each head's D numbers (Qwen3-MoE)
    q, k    = RoPE(q), RoPE(k)              when the model uses rotary positions
    a       = softmax(q k^T * s + causal mask) v       (B, H, T, D); s = 1/sqrt(D), or Granite's
                                            attention_multiplier (applied as q * (s sqrt(D)))
    y       = merge_heads(a) Wo + bo        (B, T, H D) -> (B, T, C)

Legend: B batch, T time, C channels, H query heads, Hkv key/value heads, D head size (H D need
not equal C: Config.head_dim).
Hkv = H is multi-head attention, 1 < Hkv < H grouped-query (GQA), Hkv = 1 multi-query (MQA).
RoPE and the attention core are ops (ops/attention.py); this layer adds the projections, the
head layout and, for generation, the key/value cache.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy

from minimoe import backend
from minimoe.ops import attention as ops_attention
from minimoe.ops import linear, norm
from minimoe.ops.mla import LatentKVCache


def init_params(c, pre: str, rng, std: float, std_out: float) -> dict:
    """Host float64 weights of one attention block of Config c (names under `pre`, e.g.
    "blocks.0.attn."): wqkv N(0, std), wo N(0, std_out) (it writes into the residual stream), zero
    biases bqkv (c.qkv_bias) and bo (c.bias), QK-norm gains of ones over one head (D,) or over
    the whole q (H D,) and k (Hkv D,) projections. Drawn in the order wqkv, wo."""
    C, H, Hkv, D = c.n_embd, c.n_head, c.n_kv_head, c.head_size
    p = {pre + "wqkv": rng.standard_normal((C, (H + 2 * Hkv) * D)) * std}
    if c.qkv_bias:
        p[pre + "bqkv"] = numpy.zeros((H + 2 * Hkv) * D)
    p[pre + "wo"] = rng.standard_normal((H * D, C)) * std_out
    if c.bias:
        p[pre + "bo"] = numpy.zeros(C)
    if c.qk_norm != "none":
        p[pre + "q_norm.w"] = numpy.ones(D if c.qk_norm == "head" else H * D)
        p[pre + "k_norm.w"] = numpy.ones(D if c.qk_norm == "head" else Hkv * D)
    return p


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


def make_kv_cache(config, B, T_max, xp=None, dtype="float32"):
    """The generation cache a model of `config` needs for T_max positions: keys and values per
    key/value head (KVCache), or for attention="mla" only the latent and the RoPE key per
    position (ops/mla.py's LatentKVCache)."""
    c = config
    if c.attention == "mla":
        return LatentKVCache(c.n_layer, B, T_max, c.kv_lora_rank, c.qk_rope_head_dim, xp=xp, dtype=dtype)
    return KVCache(c.n_layer, B, c.n_kv_head, T_max, c.head_size, xp=xp, dtype=dtype)


class SelfAttentionCache(NamedTuple):
    """What `self_attention_backward` needs from its forward."""

    qkv: tuple  # linear cache of the qkv projection
    q_rope: Optional[tuple]  # RoPE caches of q and k (None without RoPE)
    k_rope: Optional[tuple]
    core: tuple  # cache of the attention core
    out: tuple  # linear cache of the output projection
    B: int
    T: int
    H: int
    Hkv: int
    D: int
    qk_norm: Optional[tuple] = None  # QKNormCache with QK-norm, else None
    q_scale: float = 1.0  # the queries were multiplied by this (attention_multiplier * sqrt(D))


class QKNorm(NamedTuple):
    """The QK-norm of `self_attention_forward`: RMSNorm gains of q and k, and where they act."""

    per_head: bool  # over each head's D numbers (Qwen3-MoE), or over all H*D of q / Hkv*D of k (OLMoE)
    wq: Any  # (D,) per head, else (H D,)
    wk: Any  # (D,) per head, else (Hkv D,)
    eps: float


class QKNormCache(NamedTuple):
    q: tuple  # RMSNorm cache of q
    k: tuple  # RMSNorm cache of k
    per_head: bool


def qk_norm_forward(qkv, qk: QKNorm, H, Hkv, D):
    """qkv (B, T, (H + 2 Hkv) D) -> the same with its q and k parts RMS-normalised, cache.

    per_head: q (B, T, H, D) and k (B, T, Hkv, D) are normalised over D, with gains (D,) shared
    by every head; else q (B, T, H D) and k (B, T, Hkv D) as whole vectors. v is untouched.
    """
    xp = backend.xp_of(qkv)
    B, T, _ = qkv.shape
    q, k, v = qkv[..., : H * D], qkv[..., H * D : (H + Hkv) * D], qkv[..., (H + Hkv) * D :]
    if qk.per_head:
        q, k = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D)
    q, cq = norm.rmsnorm_forward(q, qk.wq, qk.eps)
    k, ck = norm.rmsnorm_forward(k, qk.wk, qk.eps)
    out = xp.concatenate([q.reshape(B, T, H * D), k.reshape(B, T, Hkv * D), v], axis=-1)
    return out, QKNormCache(cq, ck, qk.per_head)


def qk_norm_backward(dqkv, cache: QKNormCache, H, Hkv, D):
    """dqkv (B, T, (H + 2 Hkv) D) -> dqkv before the norms, dwq, dwk (the gains' gradients)."""
    xp = backend.xp_of(dqkv)
    B, T, _ = dqkv.shape
    dq, dk, dv = dqkv[..., : H * D], dqkv[..., H * D : (H + Hkv) * D], dqkv[..., (H + Hkv) * D :]
    if cache.per_head:
        dq, dk = dq.reshape(B, T, H, D), dk.reshape(B, T, Hkv, D)
    dq, dwq = norm.rmsnorm_backward(dq, cache.q)
    dk, dwk = norm.rmsnorm_backward(dk, cache.k)
    return xp.concatenate([dq.reshape(B, T, H * D), dk.reshape(B, T, Hkv * D), dv], axis=-1), dwq, dwk


def self_attention_forward(
    x, wqkv, bqkv, wo, bo, n_head, n_kv_head, rope=None, kv=None, qk_norm=None, q_scale=1.0
):
    """x (B, T, C) -> y (B, T, C), cache. Causal multi-head self-attention with grouped-query heads.

    wqkv (C, (H + 2 Hkv) D) holds the query, key and value projections side by side [q | k | v];
    bqkv ((H + 2 Hkv) D,) or None; wo (H D, C); bo (C,) or None.
    rope: None, or (cos, sin) tables (T, D/2) for these T positions.
    kv: None, or (KVCache, layer) to append this call's keys/values and attend over all cached
        positions (generation; the backward is not available then).
    qk_norm: None, or a QKNorm: RMSNorm of q and k after the projection, before RoPE.
    q_scale: the queries are multiplied by it after RoPE, so the scores are q k^T * q_scale / sqrt(D)
        (Granite's attention_multiplier m is q_scale = m sqrt(D)).
    """
    xp = backend.xp_of(x)
    B, T, C = x.shape
    H, Hkv = n_head, n_kv_head
    D = wo.shape[0] // H
    qkv, qkv_cache = linear.linear_forward(x, wqkv, bqkv)  # (B, T, (H + 2Hkv) D)
    norm_cache = None
    if qk_norm is not None:
        qkv, norm_cache = qk_norm_forward(qkv, qk_norm, H, Hkv, D)
    # move heads forward, (B, T, n, D) -> (B, n, T, D), n = H + 2 Hkv, copying into contiguous
    # arrays: the batched matmuls (and RoPE) run much faster on contiguous (T, D) matrices than on
    # strided views. q and k share one array, v gets its own (so it can outlive q and k).
    heads = qkv.reshape(B, T, H + 2 * Hkv, D).transpose(0, 2, 1, 3)
    qk = xp.ascontiguousarray(heads[:, : H + Hkv])
    q, k, v = qk[:, :H], qk[:, H:], xp.ascontiguousarray(heads[:, H + Hkv :])
    q_rope = k_rope = None
    if rope is not None:
        q, q_rope = ops_attention.rope_forward(q, *rope)
        k, k_rope = ops_attention.rope_forward(k, *rope)
    if q_scale != 1.0:
        q = q * q_scale
    if kv is not None:
        cache_obj, layer = kv
        p0 = cache_obj.pos
        if p0 + T > cache_obj.T_max:
            raise ValueError(f"KV cache holds {cache_obj.T_max} positions; cannot add {T} at position {p0}")
        cache_obj.k[layer][:, :, p0 : p0 + T] = k
        cache_obj.v[layer][:, :, p0 : p0 + T] = v
        k = cache_obj.k[layer][:, :, : p0 + T]
        v = cache_obj.v[layer][:, :, : p0 + T]
    a, core_cache = ops_attention.causal_attention_forward(q, k, v)  # (B, H, T, D)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, H * D)
    y, out_cache = linear.linear_forward(a, wo, bo)
    return y, SelfAttentionCache(
        qkv_cache, q_rope, k_rope, core_cache, out_cache, B, T, H, Hkv, D, norm_cache, q_scale
    )


def self_attention_backward(dy, cache: SelfAttentionCache):
    """dy (B, T, C) -> dx (B, T, C), dwqkv, dbqkv (or None), dwo, dbo (or None),
    then dwq, dwk (the QK-norm gains' gradients) when the forward had a qk_norm."""
    xp = backend.xp_of(dy)
    B, T, H, Hkv, D = cache.B, cache.T, cache.H, cache.Hkv, cache.D
    da, dwo, dbo = linear.linear_backward(dy, cache.out)
    da = da.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dq, dk, dv = ops_attention.causal_attention_backward(da, cache.core)
    if cache.q_scale != 1.0:
        dq = dq * cache.q_scale
    if cache.q_rope is not None:
        dq = ops_attention.rope_backward(dq, cache.q_rope)
        dk = ops_attention.rope_backward(dk, cache.k_rope)
    # write dq, dk, dv straight into wqkv's output layout (B, T, [dq | dk | dv]), seen as
    # (B, n, T, D) through a transposed view: one strided copy each, no concatenate
    dqkv = xp.empty((B, T, H + 2 * Hkv, D), dtype=dy.dtype)
    dheads = dqkv.transpose(0, 2, 1, 3)
    dheads[:, :H] = dq
    dheads[:, H : H + Hkv] = dk
    dheads[:, H + Hkv :] = dv
    dqkv = dqkv.reshape(B, T, (H + 2 * Hkv) * D)
    dqk_norm = ()
    if cache.qk_norm is not None:
        dqkv, dwq, dwk = qk_norm_backward(dqkv, cache.qk_norm, H, Hkv, D)
        dqk_norm = (dwq, dwk)
    dx, dwqkv, dbqkv = linear.linear_backward(dqkv, cache.qkv)
    return (dx, dwqkv, dbqkv, dwo, dbo, *dqk_norm)
