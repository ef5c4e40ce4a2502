"""Causal self-attention: RoPE, the attention core with grouped-query heads, and the whole layer.

Legend: B batch, T time, C channels, H query heads, Hkv key/value heads, D head size (C = H*D),
g = H / Hkv query heads sharing one key/value head (g = 1: multi-head; Hkv = 1: multi-query).
Query head h uses key/value head h // g (the layout of Hugging Face's `repeat_kv`).
"""

import functools
import math

from minimoe import backend

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
    return _rotate(x, cos, sin), (cos, sin)


def rope_backward(dy, cache):
    """dy (B, H, T, D) -> dx. A rotation's inverse is its transpose: rotate by -angle.
    dx1 = dy1 cos + dy2 sin,   dx2 = dy2 cos - dy1 sin."""
    cos, sin = cache
    return _rotate(dy, cos, -sin)


# ---------------------------------------------------------------------------------------------
# Attention core: softmax(q k^T / sqrt(D) + causal mask) v   (Vaswani et al. 2017, eq. 1)
# ---------------------------------------------------------------------------------------------


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
    """Slices of the batch axis, each holding about _CHUNK_BYTES of attention scores."""
    step = max(1, _CHUNK_BYTES // max(1, score_bytes_per_row))
    return [slice(b, min(b + step, B)) for b in range(0, B, step)]


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
    qs = qg * scale  # scaling q (Tq*D numbers) is cheaper than scaling the scores (Tq*Tk)
    mask = _causal_mask(Tq, Tk, xp, q.dtype)
    p = xp.empty((B, Hkv, g * Tq, Tk), dtype=q.dtype)
    y = xp.empty((B, Hkv, g * Tq, D), dtype=q.dtype)
    for b in _batch_chunks(B, p[0:1].nbytes):
        s = p[b]  # these batch rows' attention scores, turned into probabilities in place
        xp.matmul(qs[b], k[b].swapaxes(-1, -2), out=s)
        s.reshape(-1, Hkv, g, Tq, Tk)[...] += mask  # causal mask, broadcast over (B, Hkv, g)
        # softmax over keys
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        s *= 1.0 / s.sum(axis=-1, keepdims=True)  # one division per row, then multiplies
        xp.matmul(s, v[b], out=y[b])
    return y.reshape(B, H, Tq, D), (qg, k, v, p, scale)


def causal_attention_backward(dy, cache):
    """dy (B, H, Tq, D) -> dq (B, H, Tq, D), dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, D).

    y = p v            =>  dv = p^T dy,   dp = dy v^T
    p = softmax(s)     =>  ds = p * (dp - sum_keys(dp * p))   (masked entries have p = 0, ds = 0)
    s = q k^T * scale  =>  dq = ds k * scale,  dk = ds^T q * scale
    Because the g heads of a group were stacked along time, the matmuls for dk and dv sum over
    the group automatically (a key/value head's gradient is the sum over the heads that read it).
    """
    xp = backend.xp_of(dy)
    qg, k, v, p, scale = cache
    B, H, Tq, D = dy.shape
    Hkv = k.shape[1]
    dyg = dy.reshape(B, Hkv, -1, D)
    dq, dk, dv = (xp.empty(a.shape, dtype=dy.dtype) for a in (qg, k, v))
    for b in _batch_chunks(B, p[0:1].nbytes):  # a few batch rows at a time, as in the forward
        xp.matmul(p[b].swapaxes(-1, -2), dyg[b], out=dv[b])
        dp = dyg[b] @ v[b].swapaxes(-1, -2)
        # softmax backward in place in dp; einsum sums dp * p without a (Tq, Tk) temporary
        dp -= xp.einsum("...ij,...ij->...i", dp, p[b])[..., None]
        dp *= p[b]
        ds = dp
        xp.matmul(ds, k[b], out=dq[b])
        xp.matmul(ds.swapaxes(-1, -2), qg[b], out=dk[b])
    # the scale goes on the (T, D) results rather than on ds (Tq, Tk)
    dq *= scale
    dk *= scale
    return dq.reshape(B, H, Tq, D), dk, dv
