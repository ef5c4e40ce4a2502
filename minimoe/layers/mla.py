"""The Multi-head Latent Attention block (DeepSeek-V2/V3): its parameters in the model's dict, and
its forward/backward on top of ops/mla.py (the math and the derivation live there).

Parameter names under `blocks.i.attn.` (stored (in, out); transformers' DeepseekV3Attention names
`self_attn.*` in brackets, whose weights are the transposes; rq = q_lora_rank, rkv = kv_lora_rank,
dn, dr, dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim):
    wq           (C, H (dn + dr))      [q_proj]              when q_lora_rank = 0
    wq_a         (C, rq)               [q_a_proj]            when q_lora_rank > 0
    q_a_norm.w   (rq,)                 [q_a_layernorm]
    wq_b         (rq, H (dn + dr))     [q_b_proj]
    wkv_a        (C, rkv + dr)         [kv_a_proj_with_mqa]
    kv_a_norm.w  (rkv,)                [kv_a_layernorm]
    wkv_b        (rkv, H (dn + dv))    [kv_b_proj]
    wo           (H dv, C)             [o_proj]
"""

from __future__ import annotations

import numpy

from minimoe.ops import mla

# MLAWeights field -> parameter name under the block's "attn." prefix
PARAM_NAMES = {
    "wq": "wq",
    "wq_a": "wq_a",
    "q_a_norm": "q_a_norm.w",
    "wq_b": "wq_b",
    "wkv_a": "wkv_a",
    "kv_a_norm": "kv_a_norm.w",
    "wkv_b": "wkv_b",
    "wo": "wo",
}


def init_params(c, prefix, rng, std, std_out) -> dict:
    """Host float64 initial weights of one MLA block: N(0, std) matrices, N(0, std_out) for wo
    (it writes into the residual stream), ones for the latent norms' gains."""
    H, dn, dr, dv = c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    C, rq, rkv = c.n_embd, c.q_lora_rank, c.kv_lora_rank
    p = {}
    if rq == 0:
        p[prefix + "wq"] = rng.standard_normal((C, H * (dn + dr))) * std
    else:
        p[prefix + "wq_a"] = rng.standard_normal((C, rq)) * std
        p[prefix + "q_a_norm.w"] = numpy.ones(rq)
        p[prefix + "wq_b"] = rng.standard_normal((rq, H * (dn + dr))) * std
    p[prefix + "wkv_a"] = rng.standard_normal((C, rkv + dr)) * std
    p[prefix + "kv_a_norm.w"] = numpy.ones(rkv)
    p[prefix + "wkv_b"] = rng.standard_normal((rkv, H * (dn + dv))) * std
    p[prefix + "wo"] = rng.standard_normal((H * dv, C)) * std_out
    return p


def weights(params, prefix) -> mla.MLAWeights:
    """The block's MLAWeights, read from the params dict (None for the query path not used)."""
    return mla.MLAWeights(**{f: params.get(prefix + name) for f, name in PARAM_NAMES.items()})


def mla_block_forward(c, h, params, prefix, rope, kv=None):
    """MLA(h): (B, T, C) -> (B, T, C), cache. rope: (cos, sin) of these positions, (T, dr/2).
    kv: None, or (LatentKVCache, layer) when generating (no backward then)."""
    return mla.mla_forward(h, weights(params, prefix), c.n_head, rope, c.latent_norm_eps, kv)


def mla_block_backward(dy, cache, prefix, grads):
    """Backward of `mla_block_forward`: -> dh; the block's weight gradients go to grads."""
    dh, g = mla.mla_backward(dy, cache)
    for f, name in PARAM_NAMES.items():
        if getattr(g, f) is not None:
            grads[prefix + name] = getattr(g, f)
    return dh
