"""Multi-head Latent Attention (minimoe/ops/mla.py, layers/mla.py): float64 gradient checks of the
op (direct and low-rank queries) and of the layer inside a tiny GPT, the absorbed decode path
against its plain twin, the latent KV cache (decoding == recomputation, its size == the formula),
config validation, parameter/FLOP counts (against transformers' DeepSeek-V3 built on the meta
device), mutations that the checks must catch, and parity of one layer with transformers'
DeepseekV3Attention on the same weights.
"""

import math

import numpy as np
import pytest
from conftest import BROKEN_TOL, EPS, GRAD_TOL, asarray, assert_allclose, assert_array_equal, rand, xp

from minimoe import GPT, Config, backend, gradcheck
from minimoe.errors import ConfigError
from minimoe.gradcheck import rel_error
from minimoe.layers import attention as attention_layer
from minimoe.ops import mla
from minimoe.ops.attention import rope_tables
from minimoe.presets import count_params, kv_cache_per_token, mla_attention_counts
from minimoe.sample import generate

# B, T, C, H, rq, rkv, dn, dr, dv: every size different, so a mixed-up axis cannot pass
SIZES = dict(B=2, T=5, C=6, H=3, rkv=5, dn=3, dr=4, dv=2)


def _weights(rng, rq, C=6, H=3, rkv=5, dn=3, dr=4, dv=2, scale=0.5):
    """Random float64 MLAWeights (norm gains around 1, not exactly 1, so their gradients matter)."""
    direct = rq == 0
    return mla.MLAWeights(
        wq=rand(rng, C, H * (dn + dr), scale=scale) if direct else None,
        wq_a=None if direct else rand(rng, C, rq, scale=scale),
        q_a_norm=None if direct else 1.0 + rand(rng, rq, scale=0.2),
        wq_b=None if direct else rand(rng, rq, H * (dn + dr), scale=scale),
        wkv_a=rand(rng, C, rkv + dr, scale=scale),
        kv_a_norm=1.0 + rand(rng, rkv, scale=0.2),
        wkv_b=rand(rng, rkv, H * (dn + dv), scale=scale),
        wo=rand(rng, H * dv, C, scale=scale),
    )


def _op_case(rq, seed=0):
    """(forward(x, *weights), backward -> (dx, *dweights), inputs): mla_forward checked in x and in
    every weight present."""
    rng = np.random.default_rng(seed)
    s = SIZES
    w = _weights(rng, rq)
    fields = [f for f in mla.MLAWeights._fields if getattr(w, f) is not None]
    rope = rope_tables(s["T"], s["dr"], xp=xp(), dtype="float64")

    def fwd(x, *arrays):
        ws = w._replace(**dict(zip(fields, arrays)))
        return mla.mla_forward(x, ws, s["H"], rope)

    def bwd(dy, cache):
        dx, g = mla.mla_backward(dy, cache)
        assert [f for f in g._fields if getattr(g, f) is not None] == fields
        return (dx, *[getattr(g, f) for f in fields])

    return fwd, bwd, [rand(rng, s["B"], s["T"], s["C"]), *[getattr(w, f) for f in fields]]


# ---------------------------------------------------------------------------------------------
# Gradient checks: the op, its attention core, the layer in a GPT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rq", [0, 4], ids=["direct-query", "low-rank-query"])
def test_mla_op_gradients(rq):
    fwd, bwd, inputs = _op_case(rq)
    errors = gradcheck.check_op(fwd, bwd, inputs, eps=EPS)
    assert len(errors) == (6 if rq == 0 else 8)
    assert max(errors.values()) <= GRAD_TOL, errors


def _core_inputs(rng, Tq=4, Tk=6, B=2, H=3, dn=3, dr=4, dv=2):
    return [rand(rng, B, H, Tq, dn), rand(rng, B, H, Tq, dr), rand(rng, B, H, Tk, dn),
            rand(rng, B, 1, Tk, dr), rand(rng, B, H, Tk, dv)]  # fmt: skip


@pytest.mark.parametrize("Tq,Tk", [(5, 5), (2, 6)], ids=["training", "queries-after-cached-keys"])
def test_mla_attention_core_gradients(Tq, Tk):
    inputs = _core_inputs(np.random.default_rng(3), Tq, Tk)
    errors = gradcheck.check_op(mla.mla_attend_forward, mla.mla_attend_backward, inputs, eps=EPS)
    assert max(errors.values()) <= GRAD_TOL, errors


def test_core_equals_attention_with_the_rope_key_copied_into_every_head():
    """k_h = [k_nope_h | k_pe]: the same numbers as plain causal attention over concatenated keys."""
    from minimoe.ops.attention import causal_attention_forward_reference

    qn, qp, kn, kp, v = _core_inputs(np.random.default_rng(4), 3, 6, dv=7)  # dn + dr = 7 = dv
    q = xp().concatenate([qn, qp], -1)
    k = xp().concatenate([kn, xp().repeat(kp, 3, axis=1)], -1)
    want = causal_attention_forward_reference(q, k, v)[0]
    assert rel_error(mla.mla_attend_forward(qn, qp, kn, kp, v)[0], want) <= 1e-13


def mla_config(**overrides):
    kw = dict(flavour="llama", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, ffn_hidden=12,
              init_std=0.5, attention="mla", q_lora_rank=6, kv_lora_rank=5, qk_nope_head_dim=3,
              qk_rope_head_dim=4, v_head_dim=2)  # fmt: skip
    kw.update(overrides)
    return Config(**kw)


MODEL_CASES = {
    "direct-query": dict(q_lora_rank=0),
    "low-rank-query": dict(),
    "moe": dict(n_experts=4, top_k=2, expert_hidden=6, n_shared_experts=1, first_dense=1),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_mla_model_gradients(case):
    model = GPT(mla_config(**MODEL_CASES[case]), seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (2, 7)), rng.integers(0, 11, (2, 7))
    errors = gradcheck.check_model(model, idx, targets, eps=EPS)
    attn = sorted(k.split("attn.")[1] for k in errors if k.startswith("blocks.0.attn."))
    want = ["kv_a_norm.w", "wkv_a", "wkv_b", "wo"] + (["wq"] if case == "direct-query" else
                                                       ["q_a_norm.w", "wq_a", "wq_b"])  # fmt: skip
    assert attn == sorted(want)
    assert max(errors.values()) <= GRAD_TOL, max(errors, key=errors.get)


# ---------------------------------------------------------------------------------------------
# Mutations: a wrong backward fails the same checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rq", [0, 4])
@pytest.mark.parametrize("how", ["scale", "flip"])
def test_each_broken_gradient_is_caught(rq, how):
    fwd, bwd, inputs = _op_case(rq)
    for position in range(len(inputs)):

        def broken(dy, cache, position=position):
            grads = list(bwd(dy, cache))
            g = grads[position].copy()
            if how == "scale":
                g *= 1.01
            else:
                g.reshape(-1)[int(abs(g).argmax())] *= -1.0
            grads[position] = g
            return tuple(grads)

        errors = gradcheck.check_op(fwd, broken, inputs, eps=EPS)
        assert errors[position] > BROKEN_TOL, (position, errors)
        assert all(e <= GRAD_TOL for i, e in errors.items() if i != position)


_attend_backward = mla.mla_attend_backward  # the real one, for the wrong versions to build on


def rope_key_of_head_zero_only(do, cache):
    """A plausible mistake: the shared RoPE key's gradient taken from one head, not summed."""
    dq_nope, dq_pe, dk_nope, _, dv = _attend_backward(do, cache)
    ds = cache.probs * (do @ cache.v.swapaxes(-1, -2))
    ds = (ds - cache.probs * ds.sum(-1, keepdims=True)) * cache.scale
    return dq_nope, dq_pe, dk_nope, (ds.swapaxes(-1, -2) @ cache.q_pe)[:, :1], dv


def scale_of_the_nope_part_only(do, cache):
    """Another: scaling by 1/sqrt(dn) in the backward (the forward scales by 1/sqrt(dn + dr))."""
    grads = _attend_backward(do, cache)
    dn, dr = cache.q_nope.shape[-1], cache.q_pe.shape[-1]
    return tuple(g * math.sqrt((dn + dr) / dn) for g in grads)


@pytest.mark.parametrize("wrong", [rope_key_of_head_zero_only, scale_of_the_nope_part_only])
def test_wrong_derivation_fails_the_op_and_model_checks(monkeypatch, wrong):
    monkeypatch.setattr(mla, "mla_attend_backward", wrong)
    fwd, bwd, inputs = _op_case(4)
    assert max(gradcheck.check_op(fwd, bwd, inputs, eps=EPS).values()) > BROKEN_TOL
    model = GPT(mla_config(), seed=0, dtype="float64")
    idx = np.random.default_rng(0).integers(0, 11, (2, 7))
    errors = gradcheck.check_model(model, idx, idx, eps=EPS, names=["blocks.1.attn.wkv_a"])
    assert errors["blocks.1.attn.wkv_a"] > BROKEN_TOL


def test_forgetting_the_latent_norm_backward_is_caught(monkeypatch):
    real = mla.norm.rmsnorm_backward
    monkeypatch.setattr(mla.norm, "rmsnorm_backward", lambda dy, cache: (dy * cache.w, real(dy, cache)[1]))
    fwd, bwd, inputs = _op_case(4)
    errors = gradcheck.check_op(fwd, bwd, inputs, eps=EPS)
    assert errors[0] > BROKEN_TOL  # dx
    assert errors[2] <= GRAD_TOL  # q_a_norm's own gain gradient does not use that term


# ---------------------------------------------------------------------------------------------
# Decoding: the absorbed path, the latent cache, generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Tq,Tk", [(1, 7), (3, 7), (6, 6)])
def test_absorbed_decode_equals_the_expanded_plain_twin(Tq, Tk):
    rng = np.random.default_rng(Tq)
    H, dn, dr, dv, rkv = 3, 3, 4, 2, 5
    q_nope, q_pe = rand(rng, 2, H, Tq, dn), rand(rng, 2, H, Tq, dr)
    c_kv, k_pe, wkv_b = rand(rng, 2, Tk, rkv), rand(rng, 2, Tk, dr), rand(rng, rkv, H * (dn + dv))
    plain = mla.mla_attend_expanded(q_nope, q_pe, c_kv, k_pe, wkv_b)
    fast = mla.mla_attend_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b)
    assert plain.shape == fast.shape == (2, H, Tq, dv)
    assert rel_error(fast, plain) <= 1e-13


@pytest.mark.parametrize("rq", [0, 4])
def test_op_decoding_with_the_latent_cache_equals_full_recomputation(rq):
    rng = np.random.default_rng(7)
    T, H, dr, rkv = 9, 3, 4, 5
    w = _weights(rng, rq)
    x = rand(rng, 2, T, 6)
    cos, sin = rope_tables(T, dr, xp=xp(), dtype="float64")
    full, cache = mla.mla_forward(x, w, H, (cos, sin))
    kv = mla.LatentKVCache(1, 2, T, rkv, dr, xp=xp(), dtype="float64")
    steps = [(0, 4), (4, 5), (5, 6), (6, 9)]  # a prefill of 4, single tokens, a chunk of 3
    for a, b in steps:
        y, none = mla.mla_forward(x[:, a:b], w, H, (cos[a:b], sin[a:b]), kv=(kv, 0))
        kv.pos = b
        assert none is None and rel_error(y, full[:, a:b]) <= 1e-12, (a, b)
    # the cache holds exactly the normalised latent and the rotated RoPE key of every position
    assert rel_error(kv.c_kv[0], cache.kv_norm.xhat * w.kv_a_norm) <= 1e-14
    assert rel_error(kv.k_pe[0], cache.core.k_pe[:, 0]) <= 1e-14
    with pytest.raises(ValueError, match="cannot add"):
        mla.mla_forward(x[:, :1], w, H, (cos[:1], sin[:1]), kv=(kv, 0))


GEN_CASES = {
    "direct-query": dict(q_lora_rank=0),
    "low-rank-query": dict(),
    "moe-deepseek": dict(
        n_experts=6,
        top_k=2,
        expert_hidden=8,
        n_shared_experts=1,
        first_dense=1,
        router="sigmoid_bias",
        aux_loss_coef=0.0,
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(GEN_CASES))
@pytest.mark.parametrize("temperature,top_k,seed", [(0.0, None, None), (0.8, 4, 7)])
def test_generation_with_the_latent_cache_equals_recomputation(case, temperature, top_k, seed):
    cfg = mla_config(vocab_size=13, block_size=12, n_embd=16, n_head=4, init_std=0.4, **GEN_CASES[case])
    model = GPT(cfg, seed=0, dtype="float64")
    kw = dict(max_new_tokens=20, temperature=temperature, top_k=top_k, seed=seed)
    prompt = [1, 5, 2, 7, 3]  # 5 + 20 > block_size: prefill, cached decode, then the sliding window
    cached = generate(model, prompt, use_cache=True, **kw)
    assert cached == generate(model, prompt, use_cache=False, **kw)
    assert len(cached) == 20 and len(set(cached)) > 1


def test_generation_uses_the_latent_cache():
    model = GPT(mla_config(), seed=0, dtype="float64")
    seen = []
    forward = model.forward

    def spy(idx, targets=None, kv_cache=None):
        seen.append((idx.shape, type(kv_cache).__name__))
        return forward(idx, targets, kv_cache)

    model.forward = spy
    generate(model, [1, 2, 3], max_new_tokens=4, temperature=0.0)
    assert seen == [((1, 3), "LatentKVCache")] + [((1, 1), "LatentKVCache")] * 3


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("float64", 8)])
def test_cache_memory_per_token_is_the_formula(dtype, itemsize):
    B, T = 3, 10
    mla_cfg = mla_config(n_layer=3, kv_lora_rank=7, qk_rope_head_dim=6)
    assert kv_cache_per_token(mla_cfg) == 3 * (7 + 6)  # n_layer (rkv + dr): no head in it
    cache = attention_layer.make_kv_cache(mla_cfg, B, T, xp=xp(), dtype=dtype)
    assert isinstance(cache, mla.LatentKVCache)
    assert cache.nbytes == B * T * kv_cache_per_token(mla_cfg) * itemsize
    for n_kv_head in (4, 2, 1):  # MHA, GQA, MQA: 2 Hkv D per layer
        cfg = Config(flavour="llama", n_layer=3, n_head=4, n_kv_head=n_kv_head, n_embd=16)
        assert kv_cache_per_token(cfg) == 3 * 2 * n_kv_head * 4
        kv = attention_layer.make_kv_cache(cfg, B, T, xp=xp(), dtype=dtype)
        assert sum(a.nbytes for a in kv.k + kv.v) == B * T * kv_cache_per_token(cfg) * itemsize


def test_deepseek_v3_cache_sizes_per_token_and_layer():
    """docs/mla.md's table: 128 heads of 128; MLA 512 + 64."""
    base = dict(flavour="llama", n_layer=1, n_head=128, n_embd=128 * 128, counted_only=True)
    got = {
        n: kv_cache_per_token(Config(**base, n_kv_head=h)) for n, h in (("mha", 128), ("gqa8", 8), ("mqa", 1))
    }
    got["mla"] = kv_cache_per_token(Config(**base, attention="mla", kv_lora_rank=512, qk_rope_head_dim=64))
    assert got == {"mha": 32768, "gqa8": 2048, "mqa": 256, "mla": 576}


def test_rope_interleave_perm():
    """Interleaved-pairs RoPE of x (DeepSeek's layout, written out here) == our rotate-halves of x[perm]."""
    from minimoe.ops.attention import rope_forward

    rng = np.random.default_rng(0)
    x = rand(rng, 1, 2, 5, 6)
    cos, sin = rope_tables(5, 6, xp=xp(), dtype="float64")
    ev, od = x[..., 0::2], x[..., 1::2]
    interleaved = xp().concatenate([ev * cos - od * sin, od * cos + ev * sin], -1)
    assert mla.rope_interleave_perm(6) == [0, 2, 4, 1, 3, 5]
    assert rel_error(rope_forward(x[..., mla.rope_interleave_perm(6)], cos, sin)[0], interleaved) <= 1e-15


def test_checkpoint_round_trip_keeps_mla(tmp_path):
    from minimoe import checkpoint

    model = GPT(mla_config(), seed=3)
    back = checkpoint.build_model(
        checkpoint.load_checkpoint(checkpoint.save_checkpoint(tmp_path / "ck", model))
    )
    assert back.config == model.config and back.config.attention == "mla"
    idx = np.array([[1, 2, 3, 4]])
    assert_array_equal(back.forward(idx)[0], model.forward(idx)[0])


# ---------------------------------------------------------------------------------------------
# Config: defaults, and combinations refused by name
# ---------------------------------------------------------------------------------------------


def test_mla_defaults_follow_deepseek_v2_proportions():
    c = Config(flavour="llama", n_embd=64, n_head=4, attention="mla", q_lora_rank=None)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        0,
        64,
        16,
        8,
        16,
    )
    assert c.rope_dim == 8 and Config.from_dict(c.to_dict()) == c
    plain = Config(flavour="llama", n_embd=64, n_head=4)
    assert plain.kv_lora_rank is None and plain.rope_dim == 16


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(attention="gqa"), "attention"),
        (dict(kv_lora_rank=8), "kv_lora_rank"),  # an MLA size on an MHA model
        (dict(q_lora_rank=4), "q_lora_rank"),
        (dict(attention="mla", qk_rope_head_dim=3), "qk_rope_head_dim"),
        (dict(attention="mla", kv_lora_rank=0), "kv_lora_rank"),
        (dict(attention="mla", v_head_dim=2.5), "v_head_dim"),
        (dict(attention="mla", q_lora_rank=-1), "q_lora_rank"),
        (dict(attention="mla", latent_norm_eps=0.0), "latent_norm_eps"),
        (dict(attention="mla", pos_emb="learned"), "pos_emb"),
        (dict(attention="mla", bias=True), "bias"),
        (dict(attention="mla", n_kv_head=2), "n_kv_head"),
    ],
)
def test_bad_mla_configs_are_refused_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"Config\.{field} ="):
        Config(flavour="llama", n_embd=16, n_head=4, **kw)


# ---------------------------------------------------------------------------------------------
# Counting: parameters and FLOPs, against a built model and against transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_count_matches_the_built_model(case):
    cfg = mla_config(**MODEL_CASES[case])
    counted = count_params(cfg)
    assert counted["total"] == GPT(cfg).num_params()
    if case != "moe":
        assert counted["active"] == counted["total"]


def test_mla_flops_by_hand():
    c = mla_config(n_layer=1, q_lora_rank=0)  # C 8, H 2, rkv 5, dn 3, dr 4, dv 2, F 12, V 11, T 8
    attn = 8 * 2 * 7 + 8 * (5 + 4) + 5 * 2 * (3 + 2) + 2 * 2 * 8  # W_q, W_dkv, W_ukv, W_o
    matmul = attn + 3 * 8 * 12 + 11 * 8  # + the SwiGLU MLP and the head
    scores = 8 * 2 * (3 + 4 + 2)  # T keys: q.k over dn + dr and p.v over dv, per head
    assert count_params(c)["flops_per_token"] == 2 * matmul + 2 * scores


DEEPSEEK_V3 = dict(
    flavour="llama", vocab_size=129280, block_size=4096, n_layer=61, n_head=128, n_embd=7168, ffn_hidden=18432,
    first_dense=3, n_experts=256, top_k=8, expert_hidden=2048, n_shared_experts=1, router="sigmoid_bias",
    attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, counted_only=True,
)  # fmt: skip


def test_deepseek_v3_count_is_the_published_671b():
    """DeepSeek-V3 technical report: 671B total parameters (the main model; the 14B multi-token
    prediction module is extra). Active: 37B in the report; we count the embedding and head too."""
    got = count_params(Config(**DEEPSEEK_V3))
    assert got["total"] == 671_026_404_352  # = transformers' DeepseekV3ForCausalLM (next test)
    assert round(got["total"] / 1e9) == 671
    assert 37e9 <= got["active"] < 38e9


@pytest.mark.parametrize(
    "kw",
    [dict(DEEPSEEK_V3), dict(DEEPSEEK_V3, q_lora_rank=0, n_layer=5)],
    ids=["deepseek-v3-671b", "direct-query"],
)
def test_count_equals_transformers_deepseek_v3_on_the_meta_device(kw):
    torch = pytest.importorskip("torch", reason="counts transformers' DeepSeek-V3 (the compare extra)")
    transformers = pytest.importorskip("transformers", reason="counts transformers' DeepSeek-V3")
    c = Config(**kw)
    hf = transformers.DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
        moe_intermediate_size=c.expert_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head, n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_experts,
        num_experts_per_tok=c.top_k, first_k_dense_replace=c.first_dense, q_lora_rank=c.q_lora_rank or None,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, num_mtp_layers=0,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(hf)
    assert count_params(c)["total"] == sum(p.numel() for p in model.parameters())
    attn = model.model.layers[0].self_attn
    assert sum(p.numel() for p in attn.parameters()) == mla_attention_counts(c)[0]


# ---------------------------------------------------------------------------------------------
# Parity with transformers' DeepseekV3Attention (one layer, float64, the same weights)
# ---------------------------------------------------------------------------------------------

PARITY = dict(hidden_size=12, num_attention_heads=3, kv_lora_rank=5, qk_nope_head_dim=4, qk_rope_head_dim=6,
              v_head_dim=2, rope_theta=10000.0)  # fmt: skip


def _hf_attention(torch, transformers, q_lora_rank, rope_interleave):
    p = PARITY
    cfg = transformers.DeepseekV3Config(
        hidden_size=p["hidden_size"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_attention_heads"], q_lora_rank=q_lora_rank, kv_lora_rank=p["kv_lora_rank"],
        qk_nope_head_dim=p["qk_nope_head_dim"], qk_rope_head_dim=p["qk_rope_head_dim"],
        v_head_dim=p["v_head_dim"], rope_interleave=rope_interleave, num_hidden_layers=1, vocab_size=8,
        rope_parameters={"rope_type": "default", "rope_theta": p["rope_theta"]},
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"  # its softmax keeps float64 (eager's is float32)
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as md

    torch.manual_seed(0)
    attn = md.DeepseekV3Attention(cfg, layer_idx=0).double()
    with torch.no_grad():
        for name, w in attn.named_parameters():
            w.copy_(1.0 + 0.2 * torch.randn_like(w) if "layernorm" in name else 0.4 * torch.randn_like(w))
    return md, cfg, attn


def _ours_from_hf(attn, q_lora_rank, rope_interleave):
    """MLAWeights from DeepseekV3Attention's weights: transposes, and for rope_interleave the
    documented permutation of the RoPE columns (rope_interleave_perm) of W_q / W_uq and W_dkv."""
    p = PARITY
    H, dn, dr, rkv = p["num_attention_heads"], p["qk_nope_head_dim"], p["qk_rope_head_dim"], p["kv_lora_rank"]
    perm = mla.rope_interleave_perm(dr) if rope_interleave else list(range(dr))
    q_cols = [h * (dn + dr) + j for h in range(H) for j in list(range(dn)) + [dn + i for i in perm]]
    kv_cols = list(range(rkv)) + [rkv + i for i in perm]

    def t(name):
        return getattr(attn, name).weight.detach().numpy().T

    direct = q_lora_rank is None
    w = mla.MLAWeights(
        wq=t("q_proj")[:, q_cols] if direct else None,
        wq_a=None if direct else t("q_a_proj"),
        q_a_norm=None if direct else attn.q_a_layernorm.weight.detach().numpy().copy(),
        wq_b=None if direct else t("q_b_proj")[:, q_cols],
        wkv_a=t("kv_a_proj_with_mqa")[:, kv_cols],
        kv_a_norm=attn.kv_a_layernorm.weight.detach().numpy().copy(),
        wkv_b=t("kv_b_proj"),
        wo=t("o_proj"),
    )
    hf_grad = {  # MLAWeights field -> (our gradient's layout) of the HF parameter's gradient
        "wq": lambda: attn.q_proj.weight.grad.numpy().T[:, q_cols],
        "wq_a": lambda: attn.q_a_proj.weight.grad.numpy().T,
        "q_a_norm": lambda: attn.q_a_layernorm.weight.grad.numpy(),
        "wq_b": lambda: attn.q_b_proj.weight.grad.numpy().T[:, q_cols],
        "wkv_a": lambda: attn.kv_a_proj_with_mqa.weight.grad.numpy().T[:, kv_cols],
        "kv_a_norm": lambda: attn.kv_a_layernorm.weight.grad.numpy(),
        "wkv_b": lambda: attn.kv_b_proj.weight.grad.numpy().T,
        "wo": lambda: attn.o_proj.weight.grad.numpy().T,
    }
    return w, hf_grad


def _parity(torch, transformers, q_lora_rank, rope_interleave, patched):
    """(output error, input-gradient error, worst weight-gradient error, its name)."""
    md, cfg, attn = _hf_attention(torch, transformers, q_lora_rank, rope_interleave)
    w, hf_grad = _ours_from_hf(attn, q_lora_rank, rope_interleave)
    B, T, H = 2, 7, PARITY["num_attention_heads"]
    rng = np.random.default_rng(1)
    x, dy = (rng.standard_normal((B, T, PARITY["hidden_size"])) for _ in range(2))  # host: torch reads them
    cos, sin = rope_tables(T, PARITY["qk_rope_head_dim"], PARITY["rope_theta"], xp=np, dtype="float64")
    if patched:  # our float64 tables, as transformers lays them out: [angles | angles]
        pos_emb = tuple(torch.from_numpy(np.concatenate([a, a], -1))[None] for a in (cos, sin))
    else:  # transformers' own tables (computed in float32)
        pos_emb = md.DeepseekV3RotaryEmbedding(cfg)(
            torch.zeros(1, dtype=torch.float64), torch.arange(T)[None]
        )
    xt = torch.from_numpy(x).requires_grad_(True)
    out, _ = attn(xt, position_embeddings=pos_emb, attention_mask=None)
    out.backward(torch.from_numpy(dy))
    # ours on the session's backend (torch's side stays on the host)
    w = w._replace(**{f: asarray(getattr(w, f)) for f in w._fields if getattr(w, f) is not None})
    y, cache = mla.mla_forward(asarray(x), w, H, (asarray(cos), asarray(sin)), eps=1e-6)
    dx, grads = mla.mla_backward(asarray(dy), cache)
    errs = {f: rel_error(getattr(grads, f), hf_grad[f]()) for f in w._fields if getattr(w, f) is not None}
    worst = max(errs, key=errs.get)
    return rel_error(y, out.detach().numpy()), rel_error(dx, xt.grad.numpy()), errs[worst], worst


@pytest.fixture
def tf(tf_raw):
    torch, transformers = tf_raw
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("this transformers has no DeepSeek-V3")
    return torch, transformers


@pytest.mark.parametrize("rope_interleave", [True, False], ids=["interleaved-rope", "halves-rope"])
@pytest.mark.parametrize("q_lora_rank", [None, 4], ids=["direct-query", "low-rank-query"])
def test_parity_with_transformers_deepseek_v3_attention(tf, monkeypatch, q_lora_rank, rope_interleave):
    """transformers computes DeepseekV3RMSNorm in float32 whatever the dtype, and its RoPE tables
    too: the patched run replaces the norm's forward by the same formula in float64 and passes
    float64 tables; the unpatched run (transformers' own code) agrees to float32 round-off."""
    torch, transformers = tf
    unpatched = _parity(torch, transformers, q_lora_rank, rope_interleave, patched=False)
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as md

    def rmsnorm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(md.DeepseekV3RMSNorm, "forward", rmsnorm)
    patched = _parity(torch, transformers, q_lora_rank, rope_interleave, patched=True)
    for name, (e_y, e_dx, e_w, worst) in (("patched", patched), ("unpatched", unpatched)):
        print(f"\n{name}: output {e_y:.1e}  dx {e_dx:.1e}  worst weight grad {e_w:.1e} ({worst})")
    assert max(patched[:3]) <= 1e-12, patched
    assert max(unpatched[:3]) <= 1e-5, unpatched


# ---------------------------------------------------------------------------------------------
# CuPy: the numpy-backed fake (tests/fake_cupy.py) refuses any hidden host/device copy
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_cupy_backend():
    import fake_cupy

    name, dtype = backend.get_backend(), backend.get_default_dtype()
    try:
        with fake_cupy.installed() as cp:
            yield cp
    finally:
        backend.set_backend(name)
        backend.set_default_dtype(dtype)


def test_mla_on_fake_cupy_matches_numpy(fake_cupy_backend):
    out = {}
    for on in ("numpy", "cupy"):
        backend.set_backend(on)
        model = GPT(mla_config(init_std=0.1, **MODEL_CASES["moe"]), seed=0).eval()  # float32
        idx = np.random.default_rng(0).integers(0, 11, (2, 7))
        logits, loss = model.forward(idx, idx)
        grads = model.backward()
        assert backend.is_cupy_array(grads["blocks.0.attn.wkv_b"]) == (on == "cupy")
        out[on] = {k: backend.to_numpy(v) for k, v in {"logits": logits, "loss": loss, **grads}.items()}
        out[on]["tokens"] = np.array([generate(model, [1, 2, 3], 8, temperature=0.0, use_cache=u)
                                      for u in (True, False)])  # fmt: skip
    for k, ref in out["numpy"].items():
        assert_allclose(out["cupy"][k], ref, rtol=1e-5, atol=1e-7, err_msg=k)
    assert (out["cupy"]["tokens"][0] == out["cupy"]["tokens"][1]).all()
