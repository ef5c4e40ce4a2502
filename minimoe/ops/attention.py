"""Causal self-attention: RoPE, the attention core with grouped-query heads, and the whole layer.

Legend: B batch, T time, C channels, H query heads, Hkv key/value heads, D head size (C = H*D),
g = H / Hkv query heads sharing one key/value head (g = 1: multi-head; Hkv = 1: multi-query).
Query head h uses key/value head h // g (the layout of Hugging Face's `repeat_kv`).
RoPE and the attention core come first as `*_reference`, the formula written plainly; the fast
versions below them compute the same numbers (a test checks them equal in float64).
"""

import functools
import math
from typing import Any, NamedTuple

from minimoe import backend
from minimoe.ops import parallel

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


def rope_forward_reference(x, cos, sin):
    """x (B, H, T, D), cos/sin (T, D/2) -> (B, H, T, D), the plain twin of `rope_forward`:
    y1 = x1 cos - x2 sin,  y2 = x2 cos + x1 sin,  x = [x1 | x2] split in halves."""
    xp = backend.xp_of(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1), (cos, sin)


def rope_backward_reference(dy, cache):
    """dy (B, H, T, D) -> dx, the rotation by -angle, the plain twin of `rope_backward`:
    dx1 = dy1 cos + dy2 sin,  dx2 = dy2 cos - dy1 sin."""
    cos, sin = cache
    xp = backend.xp_of(dy)
    half = dy.shape[-1] // 2
    dy1, dy2 = dy[..., :half], dy[..., half:]
    return xp.concatenate([dy1 * cos + dy2 * sin, dy2 * cos - dy1 * sin], axis=-1)


def _rotate(x, cos, sin):
    """y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin, computed over whole rows of D as
        y = x * [cos | cos] + swap(x * [sin | -sin]),   swap([a | b]) = [b | a].
    NumPy runs an op on a (..., D/2) half as many short inner loops, so whole-row ops are
    several times faster; only the final add touches halves."""
    xp = backend.xp_of(x)
    D = x.shape[-1]
    y = xp.empty(x.shape, dtype=x.dtype)
    xp.multiply(x, xp.concatenate([cos, cos], axis=-1), out=y)
    t = x * xp.concatenate([sin, -sin], axis=-1)
    halves = (*x.shape[:-1], 2, D // 2)
    y.reshape(halves)[...] += t.reshape(halves)[..., ::-1, :]  # += swap(t), a view, no copy
    return y


def rope_forward(x, cos, sin):
    """x (B, H, T, D), cos/sin (T, D/2) -> (B, H, T, D).
    y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin."""
    # Fast twin of rope_forward_reference: whole-row operations instead of halves (see _rotate).
    return _rotate(x, cos, sin), (cos, sin)


def rope_backward(dy, cache):
    """dy (B, H, T, D) -> dx. A rotation's inverse is its transpose: rotate by -angle.
    dx1 = dy1 cos + dy2 sin,   dx2 = dy2 cos - dy1 sin."""
    # Fast twin of rope_backward_reference: the forward's whole-row rotation, by -angle.
    cos, sin = cache
    return _rotate(dy, cos, -sin)


# ---------------------------------------------------------------------------------------------
# Attention core: softmax(q k^T / sqrt(D) + causal mask) v   (Vaswani et al. 2017, eq. 1)
# ---------------------------------------------------------------------------------------------


class AttentionCache(NamedTuple):
    q: Any  # (B, H, Tq, D) queries
    k: Any  # (B, Hkv, Tk, D) keys
    v: Any  # (B, Hkv, Tk, D) values
    probs: Any  # (B, H, Tq, Tk) attention weights softmax(q k^T * scale + mask), 0 where masked
    scale: float  # 1 / sqrt(D)


def causal_attention_forward_reference(q, k, v):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) -> y (B, H, Tq, D), the plain twin of
    `causal_attention_forward`:  y = softmax(q k^T / sqrt(D) + mask) v,  with each query head h
    reading a copy of key/value head h // g, and query i (at position Tk - Tq + i) masked from
    the keys after it."""
    xp = backend.xp_of(q)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kh, vh = xp.repeat(k, H // Hkv, axis=1), xp.repeat(v, H // Hkv, axis=1)  # (B, H, Tk, D)
    scale = 1.0 / math.sqrt(D)
    s = (q @ kh.swapaxes(-1, -2)) * scale  # (B, H, Tq, Tk) scores
    future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)  # key j after query i's position
    s = xp.where(future, -xp.inf, s)
    p = xp.exp(s - s.max(axis=-1, keepdims=True))  # softmax over keys
    p = p / p.sum(axis=-1, keepdims=True)
    return p @ vh, AttentionCache(q, k, v, p, scale)


def causal_attention_backward_reference(dy, cache):
    """dy (B, H, Tq, D) -> dq (B, H, Tq, D), dk, dv (B, Hkv, Tk, D), the plain twin of
    `causal_attention_backward`:  dv = p^T dy,  dp = dy v^T,  ds = p * (dp - sum_keys(dp * p)),
    dq = ds k * scale,  dk = ds^T q * scale,  each summed over the g query heads of a kv head."""
    xp = backend.xp_of(dy)
    q, p, scale = cache.q, cache.probs, cache.scale
    B, H, Tq, D = q.shape
    Hkv, Tk = cache.k.shape[1], cache.k.shape[2]
    g = H // Hkv
    kh, vh = xp.repeat(cache.k, g, axis=1), xp.repeat(cache.v, g, axis=1)
    dvh = p.swapaxes(-1, -2) @ dy
    dp = dy @ vh.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward
    dq = (ds @ kh) * scale
    dkh = (ds.swapaxes(-1, -2) @ q) * scale
    # a key/value head's gradient is the sum over the g query heads that read it
    dk = dkh.reshape(B, Hkv, g, Tk, D).sum(axis=2)
    dv = dvh.reshape(B, Hkv, g, Tk, D).sum(axis=2)
    return dq, dk, dv


@functools.lru_cache(maxsize=16)
def _causal_mask(Tq, Tk, xp, dtype):
    """(Tq, Tk) additive mask: 0 where query i (at position Tk - Tq + i) may see key j, else -inf.
    Cached: building it with `where` costs more than using it, and it depends on sizes only."""
    allowed = xp.arange(Tk)[None, :] <= (xp.arange(Tq) + (Tk - Tq))[:, None]
    return xp.where(allowed, 0.0, -xp.inf).astype(dtype)


# The (Tq, Tk) scores are made and softmaxed a few batch rows at a time, so that the softmax's
# passes over them hit the CPU cache instead of memory (about 4 MB of scores per chunk: at the
# laptop size the whole batch is one chunk, at T = 256 this made attention ~20% faster).
_CHUNK_BYTES = 4 * 2**20


def _batch_chunks(B, score_bytes_per_row):
    """Slices of the batch axis, each holding about _CHUNK_BYTES of attention scores; with
    parallel workers, at least two per worker (so that a worker that starts late still finds
    some, see ops/parallel.py)."""
    step = max(1, _CHUNK_BYTES // max(1, score_bytes_per_row))
    if parallel.workers() > 1:
        step = max(1, min(step, -(-B // (2 * parallel.workers()))))
    return [slice(b, min(b + step, B)) for b in range(0, B, step)]


def causal_attention_forward(q, k, v):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with Tk >= Tq -> y (B, H, Tq, D).

        y = softmax(q k^T / sqrt(D) + mask) v,   mask = -inf where key j is after query i

    The Tq queries are the LAST Tq positions of the Tk keys (Tq == Tk in training; Tq < Tk when
    generating with a key/value cache): query i sits at position Tk - Tq + i and may attend to
    keys 0 .. Tk - Tq + i.
    Grouped-query attention without copying k and v: the g query heads of a group are stacked
    along time, q -> (B, Hkv, g*Tq, D), so one batched matmul per key/value head serves them all.
    """
    # Fast twin of causal_attention_forward_reference: no copies of k and v (heads stacked along
    # time), a cached additive mask, the softmax in place a few batch rows at a time (CPU cache),
    # the batch rows shared out among the parallel workers (ops/parallel.py).
    xp = backend.xp_of(q)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = 1.0 / math.sqrt(D)
    qg = q.reshape(B, Hkv, g * Tq, D)
    mask = _causal_mask(Tq, Tk, xp, q.dtype)
    p = xp.empty((B, Hkv, g * Tq, Tk), dtype=q.dtype)
    y = xp.empty((B, Hkv, g * Tq, D), dtype=q.dtype)

    def rows(b):
        s = p[b]  # these batch rows' attention scores, turned into probabilities in place
        qs = qg[b] * scale  # scaling q (Tq*D numbers) is cheaper than scaling the scores (Tq*Tk)
        xp.matmul(qs, k[b].swapaxes(-1, -2), out=s)
        s.reshape(-1, Hkv, g, Tq, Tk)[...] += mask  # causal mask, broadcast over (B, Hkv, g)
        # softmax over keys
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        s *= 1.0 / s.sum(axis=-1, keepdims=True)  # one division per row, then multiplies
        xp.matmul(s, v[b], out=y[b])

    parallel.run([functools.partial(rows, b) for b in _batch_chunks(B, p[0:1].nbytes)])
    return y.reshape(B, H, Tq, D), AttentionCache(q, k, v, p.reshape(B, H, Tq, Tk), scale)


def causal_attention_backward(dy, cache):
    """dy (B, H, Tq, D) -> dq (B, H, Tq, D), dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, D).

    y = p v            =>  dv = p^T dy,   dp = dy v^T
    p = softmax(s)     =>  ds = p * (dp - sum_keys(dp * p))   (masked entries have p = 0, ds = 0)
    s = q k^T * scale  =>  dq = ds k * scale,  dk = ds^T q * scale
    Because the g heads of a group were stacked along time, the matmuls for dk and dv sum over
    the group automatically (a key/value head's gradient is the sum over the heads that read it).
    """
    # Fast twin of causal_attention_backward_reference: grouped heads, in place, in batch chunks
    # shared out among the parallel workers.
    xp = backend.xp_of(dy)
    k, v, scale = cache.k, cache.v, cache.scale
    B, H, Tq, D = dy.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qg = cache.q.reshape(B, Hkv, -1, D)  # the forward's grouped layout (views, no copies)
    p = cache.probs.reshape(B, Hkv, -1, Tk)
    dyg = dy.reshape(B, Hkv, -1, D)
    dq, dk, dv = (xp.empty(a.shape, dtype=dy.dtype) for a in (qg, k, v))

    def rows(b):  # a few batch rows at a time, as in the forward
        xp.matmul(p[b].swapaxes(-1, -2), dyg[b], out=dv[b])
        dp = dyg[b] @ v[b].swapaxes(-1, -2)
        # softmax backward in place in dp; einsum sums dp * p without a (Tq, Tk) temporary
        dp -= xp.einsum("...ij,...ij->...i", dp, p[b])[..., None]
        dp *= p[b]
        ds = dp
        xp.matmul(ds, k[b], out=dq[b])
        xp.matmul(ds.swapaxes(-1, -2), qg[b], out=dk[b])
        # the scale goes on the (T, D) results rather than on ds (Tq, Tk)
        dq[b] *= scale
        dk[b] *= scale

    parallel.run([functools.partial(rows, b) for b in _batch_chunks(B, p[0:1].nbytes)])
    return dq.reshape(B, H, Tq, D), dk, dv
