"""Hugging Face import/export of the real MoE families (issue 14): OLMoE, Qwen2-MoE, Qwen3-MoE,
Granite-MoE, Granite-MoE-Shared (tests/test_hf.py covers GPT-2 and Mixtral).

Without torch: the checkpoint names each family writes (listed here by hand, not from the tables),
config.json round trips, the fields we refuse and the Configs an architecture cannot export.
With torch + transformers (the `compare` extra; skipped otherwise): random tiny models of every
family built in transformers, float64 on both sides, agree with their import in logits, loss,
every parameter's gradient (max rel error <= 1e-8 per tensor) and greedy generation; our random
models, exported, give transformers our logits; and transformers' own float32 steps, left in,
still agree to float32 round-off (`test_unpatched_error_is_float32_round_off` prints the sizes).
"""

import json

import numpy as np
import pytest
from conftest import array_equal, asarray
from test_hf import check_folder_round_trip, compare_with_transformers, patch_float32_steps

from minimoe import GPT, Config, hf
from minimoe.errors import ConfigError
from minimoe.gradcheck import rel_error
from minimoe.sample import generate

PARITY_TOL = 1e-8
NO_TOKENS = dict(
    bos_token_id=None, eos_token_id=None, pad_token_id=None
)  # no padding row (its grad is 0 in HF)
TINY = dict(vocab_size=31, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
            rope_theta=1000.0, rms_norm_eps=1e-6, num_experts_per_tok=2, **NO_TOKENS)  # fmt: skip

CASES = {  # name -> config.json of a random tiny model
    "olmoe": dict(TINY, model_type="olmoe", intermediate_size=6, num_hidden_layers=2, num_experts=4,
                  norm_topk_prob=False),
    "olmoe-mqa-tied-renorm-bias": dict(TINY, model_type="olmoe", intermediate_size=6, num_hidden_layers=2,
                                       num_experts=4, num_key_value_heads=1, norm_topk_prob=True,
                                       tie_word_embeddings=True, attention_bias=True),
    "qwen2_moe": dict(TINY, model_type="qwen2_moe", intermediate_size=20, moe_intermediate_size=6,
                      shared_expert_intermediate_size=10, num_hidden_layers=3, num_experts=4,
                      mlp_only_layers=[0], norm_topk_prob=False),
    "qwen3_moe": dict(TINY, model_type="qwen3_moe", head_dim=6, intermediate_size=20, moe_intermediate_size=6,
                      num_hidden_layers=3, num_experts=4, decoder_sparse_step=2, norm_topk_prob=True,
                      attention_bias=True),
    "granitemoe": dict(TINY, model_type="granitemoe", intermediate_size=6, num_hidden_layers=2,
                       num_local_experts=4, embedding_multiplier=3.0, attention_multiplier=0.3,
                       residual_multiplier=0.4, logits_scaling=2.5, tie_word_embeddings=True),
    "granitemoeshared": dict(TINY, model_type="granitemoeshared", intermediate_size=6, num_hidden_layers=2,
                             num_local_experts=4, shared_intermediate_size=10, embedding_multiplier=2.0,
                             attention_multiplier=0.2, residual_multiplier=0.7, logits_scaling=1.5),
    "deepseek_v3": dict(TINY, model_type="deepseek_v3", num_key_value_heads=4, intermediate_size=20,
                        moe_intermediate_size=6, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        first_k_dense_replace=1, norm_topk_prob=True, q_lora_rank=6, kv_lora_rank=8,
                        qk_nope_head_dim=3, qk_rope_head_dim=4, v_head_dim=5, rope_interleave=True),
    "deepseek_v3-direct-q-plain-halves": dict(
        TINY, model_type="deepseek_v3", num_key_value_heads=4, intermediate_size=20, moe_intermediate_size=6,
        num_hidden_layers=2, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2, n_group=1,
        topk_group=1, routed_scaling_factor=1.5, first_k_dense_replace=0, norm_topk_prob=False, q_lora_rank=None,
        kv_lora_rank=6, qk_nope_head_dim=2, qk_rope_head_dim=6, v_head_dim=3, rope_interleave=False,
        tie_word_embeddings=True),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Names, configs, refusals (no torch)
# ---------------------------------------------------------------------------------------------


def expected_names(case):
    """The Hub checkpoint names of a CASES model, written out per family (independent of hf/names.py)."""
    cfg, kind = CASES[case], CASES[case]["model_type"]
    E = cfg.get("num_experts", cfg.get("num_local_experts", cfg.get("n_routed_experts")))
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.get("tie_word_embeddings"):
        names.append("lm_head.weight")
    for i in range(cfg["num_hidden_layers"]):
        L = f"model.layers.{i}."
        names += [L + "input_layernorm.weight", L + "post_attention_layernorm.weight"]
        if kind == "deepseek_v3":
            q = ["q_proj"] if cfg["q_lora_rank"] is None else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
            names += [
                f"{L}self_attn.{p}.weight" for p in q + ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"]
            ]
        names += [f"{L}self_attn.{p}_proj.weight" for p in ("o" if kind == "deepseek_v3" else "qkvo")]
        if cfg.get("attention_bias"):
            names += [f"{L}self_attn.{p}_proj.bias" for p in "qkvo"]
        if kind == "qwen2_moe":
            names += [f"{L}self_attn.{p}_proj.bias" for p in "qkv"]
        if kind in ("olmoe", "qwen3_moe"):
            names += [L + "self_attn.q_norm.weight", L + "self_attn.k_norm.weight"]
        dense = i in cfg.get("mlp_only_layers", []) or (i + 1) % cfg.get("decoder_sparse_step", 1)
        dense = dense or i < cfg.get("first_k_dense_replace", 0)
        if dense:
            names += [f"{L}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        elif kind.startswith("granite"):
            names += [L + "block_sparse_moe.router.layer.weight", L + "block_sparse_moe.input_linear.weight",
                      L + "block_sparse_moe.output_linear.weight"]  # fmt: skip
            if cfg.get("shared_intermediate_size"):
                names += [L + "shared_mlp.input_linear.weight", L + "shared_mlp.output_linear.weight"]
        else:
            names.append(L + "mlp.gate.weight")
            names += [f"{L}mlp.experts.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up", "down")]
            if kind == "qwen2_moe":
                names += [f"{L}mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")]
                names.append(L + "mlp.shared_expert_gate.weight")
            if kind == "deepseek_v3":
                names += [f"{L}mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")]
                names.append(L + "mlp.gate.e_score_correction_bias")
    return sorted(names)


def random_model(case, seed=0, init_std=0.3):
    """Our random float64 model of a CASES config, with nonzero biases and gains != 1."""
    c = hf.config_from_hf(CASES[case]).replace(init_std=init_std)
    model = GPT(c, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed)
    for k, v in model.params.items():
        if k.endswith(("bqkv", ".bo", "norm.w", "ln1.w", "ln2.w", "ln_f.w")):
            v[...] = asarray(rng.standard_normal(v.shape) * init_std + k.endswith(".w"))
    for v in model.buffers.values():  # DeepSeek-V3's selection bias, as after some training
        v[...] = asarray(rng.standard_normal(v.shape) * 0.05)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_names_shapes_and_round_trip(case):
    model = random_model(case)
    sd = hf.to_hf(model)
    assert sorted(sd) == expected_names(case)
    again = hf.from_hf(sd, hf.hf_config_from(model), dtype="float64")
    assert all(array_equal(again.params[k], model.params[k]) for k in model.params)
    assert all(array_equal(again.buffers[k], model.buffers[k]) for k in model.buffers)
    # transformers >= 5 module names, and the RoPE layout the case's config.json says, read back too
    fused = hf.to_hf(model, layout="fused", rope_interleave=CASES[case].get("rope_interleave", True))
    again = hf.from_hf(fused, CASES[case], dtype="float64")
    assert all(array_equal(again.params[k], model.params[k]) for k in model.params)


def test_layouts_of_the_stacked_and_gated_tensors():
    # Granite stacks each expert's [gate | up] rows in input_linear (E, 2F, C)
    m = random_model("granitemoeshared")
    sd, p, F = hf.to_hf(m), m.params, 6
    inp = sd["model.layers.1.block_sparse_moe.input_linear.weight"]
    assert inp.shape == (4, 2 * F, 16)
    assert array_equal(inp[2, :F], p["blocks.1.moe.experts.w1"][2].T)
    assert array_equal(inp[2, F:], p["blocks.1.moe.experts.w3"][2].T)
    assert array_equal(
        sd["model.layers.0.block_sparse_moe.output_linear.weight"][3], p["blocks.0.moe.experts.w2"][3].T
    )
    assert array_equal(
        sd["model.layers.0.shared_mlp.input_linear.weight"][10:], p["blocks.0.moe.shared.w3"].T
    )
    # Qwen2-MoE: the shared expert's gate (1, C) and the q/k/v biases
    m = random_model("qwen2_moe")
    sd, p = hf.to_hf(m), m.params
    assert array_equal(sd["model.layers.2.mlp.shared_expert_gate.weight"], p["blocks.2.moe.shared_gate.w"].T)
    assert sd["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 16)
    assert array_equal(sd["model.layers.0.self_attn.k_proj.bias"], p["blocks.0.attn.bqkv"][16:24])
    # Qwen3-MoE: head_dim 6 with 4 heads, q_norm over one head
    m = random_model("qwen3_moe")
    sd = hf.to_hf(m)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (24, 16)
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape == (16, 24)
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (6,)
    assert hf.to_hf(random_model("olmoe"))["model.layers.0.self_attn.k_norm.weight"].shape == (8,)  # Hkv*D


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_config_round_trip(case):
    c = hf.config_from_hf(CASES[case])
    out = hf.hf_config_from(c)
    assert out["model_type"] == CASES[case]["model_type"]
    assert hf.config_from_hf(out).replace(name="") == c.replace(name="")


def test_configs_read_what_each_family_means():
    c = hf.config_from_hf(CASES["qwen2_moe"])
    assert (c.first_dense, c.moe_every, c.ffn_hidden, c.expert_hidden) == (1, 1, 20, 6)
    assert (c.n_shared_experts, c.shared_hidden, c.shared_gate, c.qkv_bias, c.bias) == (
        1,
        10,
        True,
        True,
        False,
    )
    c = hf.config_from_hf(CASES["qwen3_moe"])
    assert (c.head_size, c.qk_norm, c.moe_every, c.renormalize, c.bias, c.qkv_bias) == (
        6,
        "head",
        2,
        True,
        True,
        True,
    )
    c = hf.config_from_hf(CASES["olmoe"])
    assert (c.qk_norm, c.renormalize, c.aux_loss_coef, c.norm_eps) == ("full", False, 0.01, 1e-6)
    c = hf.config_from_hf(CASES["granitemoe"])
    assert (c.embedding_multiplier, c.attention_multiplier, c.residual_multiplier, c.logits_scaling) == (
        3.0,
        0.3,
        0.4,
        2.5,
    )
    assert c.renormalize and c.tie_embeddings and c.n_shared_experts == 0
    # transformers' default attention_multiplier is 1.0 (not 1/sqrt(D)) when the field is absent
    bare = {k: v for k, v in CASES["granitemoe"].items() if k != "attention_multiplier"}
    assert hf.config_from_hf(bare).attention_multiplier == 1.0
    # a sliding window caps the context (exact up to the window) where the family uses it
    assert (
        hf.config_from_hf(dict(CASES["qwen3_moe"], use_sliding_window=True, sliding_window=8)).block_size == 8
    )
    assert (
        hf.config_from_hf(dict(CASES["qwen3_moe"], use_sliding_window=False, sliding_window=8)).block_size
        == 16
    )
    c = hf.config_from_hf(CASES["deepseek_v3"])
    assert (c.attention, c.router, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim) == (
        "mla",
        "sigmoid_bias",
        6,
        8,
        4,
    )
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.first_dense, c.renormalize) == (
        4,
        2,
        2.5,
        1,
        True,
    )
    assert (c.n_shared_experts, c.shared_hidden, c.expert_hidden, c.ffn_hidden) == (1, 6, 6, 20)
    assert c.latent_norm_eps == 1e-6 and c.aux_loss_coef == 0.0  # balanced by its selection bias
    c = hf.config_from_hf(CASES["deepseek_v3-direct-q-plain-halves"])
    assert (c.q_lora_rank, c.n_group, c.renormalize, c.n_shared_experts) == (0, 1, False, 2)
    # Qwen3's config may spell num_experts as num_local_experts (its attribute_map)
    alias = {k: v for k, v in CASES["qwen3_moe"].items() if k != "num_experts"}
    assert hf.config_from_hf(dict(alias, num_local_experts=6)).n_experts == 6


REFUSED = [
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
    ("olmoe", dict(head_dim=6), "head_dim"),  # its q_norm spans hidden_size
    ("olmoe", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),  # only the first k layers may be dense
    ("qwen2_moe", dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size"),
    ("qwen2_moe", dict(attention_bias=True), "attention_bias"),  # Qwen2-MoE has qkv_bias instead
    ("qwen3_moe", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    ("qwen3_moe", dict(mlp_bias=True), "mlp_bias"),
    ("qwen3_moe", dict(num_experts_per_tok=5), "num_experts_per_tok"),
    ("granitemoe", dict(embedding_multiplier=0.0), "embedding_multiplier"),
    ("granitemoe", dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    ("granitemoeshared", dict(num_key_value_heads=3), "num_key_value_heads"),
    ("olmoe", dict(model_type="deepseek_v2"), "model_type"),
    ("deepseek_v3", dict(num_key_value_heads=2), "num_key_value_heads"),  # MLA has no kv heads to group
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    ("deepseek_v3", dict(topk_method="group_limited_greedy"), "topk_method"),
    ("deepseek_v3", dict(rope_scaling={"type": "yarn", "factor": 40}), "rope_scaling"),  # the real V3's
    ("deepseek_v3", dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias"),
    ("deepseek_v3", dict(n_group=3), "n_group"),  # 3 does not divide 8 experts
    # JSON types are checked before any arithmetic (minimoe.filecheck)
    ("qwen2_moe", dict(mlp_only_layers="0"), "mlp_only_layers"),
    ("deepseek_v3", dict(q_lora_rank="6"), "q_lora_rank"),
    ("olmoe", dict(num_experts=[4]), "num_experts"),
    ("granitemoe", dict(attention_multiplier="0.3"), "attention_multiplier"),
]


@pytest.mark.parametrize("case, change, field", REFUSED, ids=[f"{c}-{f}" for c, _, f in REFUSED])
def test_unrepresentable_configs_are_refused_naming_the_field(case, change, field):
    with pytest.raises(ConfigError, match=field) as e:
        hf.config_from_hf(dict(CASES[case], **change))
    assert "\n" not in str(e.value)


def test_training_time_attention_dropout_is_refused():
    cfg = dict(CASES["olmoe"], attention_dropout=0.1)
    assert hf.config_from_hf(cfg).dropout == 0.0  # inference: ignored
    with pytest.raises(ConfigError, match="attention_dropout"):
        hf.config_from_hf(cfg, training=True)


BASE = dict(flavour="llama", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, n_experts=4)
EXPORT_REFUSED = [
    (dict(qk_norm="head"), "olmoe", "qk_norm"),
    (dict(qk_norm="full", head_dim=6), "olmoe", "head_dim"),
    (dict(qk_norm="full", qkv_bias=True), "olmoe", "qkv_bias"),  # one attention_bias for q, k, v, o
    (dict(n_shared_experts=1, shared_gate=True, bias=True), "qwen2_moe", "bias"),
    (dict(n_shared_experts=2, shared_gate=True), "qwen2_moe", "n_shared_experts"),
    (dict(qk_norm="head", capacity_factor=1.25), "qwen3_moe", "capacity_factor"),
    (dict(embedding_multiplier=2.0, n_shared_experts=2), "granitemoeshared", "n_shared_experts"),
    (dict(embedding_multiplier=2.0, renormalize=False), "granitemoe", "renormalize"),
    (dict(residual_multiplier=0.5, moe_every=2), "granitemoe", "moe_every"),
    (dict(router_logit_bias=True), None, "router_logit_bias"),
    (dict(activation="relu"), None, "activation"),
    (dict(shared_gate=True, n_shared_experts=1, qk_norm="head"), "qwen2_moe", "qk_norm"),
    (dict(), "qwen3_moe", "qk_norm"),
    (dict(router="sigmoid_bias", n_shared_experts=1), None, "attention"),  # DeepSeek-V3 is MLA
    (dict(attention="mla", n_kv_head=2, router="sigmoid_bias"), None, "n_shared_experts"),
    (dict(attention="mla", n_kv_head=2, router="sigmoid_bias", n_shared_experts=1, shared_hidden=3), None,
     "shared_hidden"),
    (dict(attention="mla", n_kv_head=2, n_shared_experts=1), None, "router"),
]  # fmt: skip


@pytest.mark.parametrize(
    "change, kind, field", EXPORT_REFUSED, ids=[f"{k}-{f}" for _, k, f in EXPORT_REFUSED]
)
def test_export_refuses_what_the_architecture_lacks(change, kind, field):
    with pytest.raises(ConfigError, match=rf"Config\.{field}\b"):
        hf.hf_config_from(Config(**dict(BASE, **change)), model_type=kind)


def test_export_picks_the_family_by_its_distinctive_feature():
    pick = lambda **kw: hf.hf_config_from(Config(**dict(BASE, **kw)))["model_type"]  # noqa: E731
    assert pick(qk_norm="full") == "olmoe" and pick(qk_norm="head", n_kv_head=1) == "qwen3_moe"
    assert pick(shared_gate=True, n_shared_experts=1, qkv_bias=True) == "qwen2_moe"
    assert (
        pick(logits_scaling=3.0) == "granitemoe"
        and pick(attention_multiplier=0.1, n_shared_experts=1) == "granitemoeshared"
    )
    assert pick() == "mixtral"
    mla = dict(attention="mla", n_kv_head=2, router="sigmoid_bias", n_shared_experts=1)
    assert pick(**mla) == "deepseek_v3"
    with pytest.raises(ConfigError, match="model_type"):
        hf.hf_config_from(Config(**BASE), model_type="llama")


def test_deepseek_rope_columns_are_permuted_and_mtp_layers_ignored():
    model = random_model("deepseek_v3")
    p, dn, dr = model.params, 3, 4
    halves = hf.to_hf(model, rope_interleave=False)
    inter = hf.to_hf(model)  # DeepSeek's interleaved pairs: rows [0, 2 | 1, 3] of each head's RoPE part
    q = "model.layers.0.self_attn.q_b_proj.weight"
    assert array_equal(halves[q], p["blocks.0.attn.wq_b"].T)
    for h in range(4):  # per head [nope (3) | rope (4)]
        rows = h * (dn + dr) + dn + np.arange(dr)
        assert array_equal(inter[q][rows[[0, 2, 1, 3]]], halves[q][rows])
        assert array_equal(inter[q][h * 7 : h * 7 + dn], halves[q][h * 7 : h * 7 + dn])
    kv = "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"
    assert array_equal(inter[kv][:8], halves[kv][:8]) and array_equal(
        inter[kv][[8, 10, 9, 11]], halves[kv][8:]
    )
    assert array_equal(
        inter["model.layers.2.mlp.gate.e_score_correction_bias"], model.buffers["blocks.2.moe.router_bias"]
    )
    # the Hub checkpoint's multi-token-prediction layer (model.layers.<n_layer>.*) is not part of the model
    cfg = dict(hf.hf_config_from(model), num_nextn_predict_layers=1)
    extra = {"model.layers.3.eh_proj.weight": np.zeros((16, 32)), "model.layers.3.enorm.weight": np.ones(16)}
    again = hf.from_hf({**inter, **extra}, cfg, dtype="float64")
    assert all(array_equal(again.params[k], p[k]) for k in p)
    with pytest.raises(ValueError, match="does not use"):  # ... but only those layers
        hf.from_hf({**inter, **extra}, dict(cfg, num_nextn_predict_layers=0), dtype="float64")


def test_save_and_load_pretrained_keep_the_family(tmp_path):
    model = random_model("qwen2_moe")
    hf.save_pretrained(model, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen2_moe" and saved["architectures"] == ["Qwen2MoeForCausalLM"]
    back, _ = hf.load_pretrained(str(tmp_path), dtype="float64")
    assert all(array_equal(back.params[k], model.params[k]) for k in model.params)


# ---------------------------------------------------------------------------------------------
# Parity with transformers (float64 on both sides)
# ---------------------------------------------------------------------------------------------

MODULES = {"olmoe": "olmoe", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "granitemoe": "granitemoe",
           "granitemoeshared": "granitemoeshared", "deepseek_v3": "deepseek_v3"}  # fmt: skip


@pytest.fixture
def tf(tf_raw, monkeypatch):
    """(torch, transformers), with each family's deliberate float32 steps removed for float64 runs.

    transformers computes RMSNorm (also the QK-norms), the RoPE tables and the router softmax in
    float32 whatever the model's dtype (`.to(torch.float32)`, `dtype=torch.float`, `.float()`),
    which alone gives ~1e-7 differences. We replace exactly those forwards, in every family's
    module, by the same formulas in the input's dtype (and use SDPA attention, whose softmax keeps
    float64, and the eager loop over experts). test_unpatched_error_is_float32_round_off runs
    transformers' own code.
    """
    torch, transformers = tf_raw
    F = torch.nn.functional

    def deepseek_router(self, h):  # DeepSeek-V3's code with its float32 casts removed
        logits = F.linear(h.view(-1, self.hidden_dim), self.weight.to(h.dtype))
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        grouped = choice.view(-1, self.num_group, self.num_experts // self.num_group)
        group_idx = torch.topk(grouped.topk(2, dim=-1)[0].sum(dim=-1), k=self.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(grouped[..., 0]).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
        idx = torch.topk(choice.masked_fill(~score_mask.bool(), float("-inf")), k=self.top_k, dim=-1)[1]
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, w * self.routed_scaling_factor, idx

    def granite_router(self, h):  # Granite: top-k of the logits, softmax over those k
        logits = F.linear(h, self.weight)
        top, idx = logits.topk(self.top_k, dim=-1)
        return logits, F.softmax(top, dim=-1), idx

    def router_forward(module, cls):
        if cls == "DeepseekV3TopkRouter":
            return deepseek_router
        if module.startswith("granite") and cls.endswith("TopKRouter"):
            return granite_router
        return None

    patch_float32_steps(torch, monkeypatch, sorted(set(MODULES.values())), router_forward)
    return tf_raw


def _hf_model(torch, transformers, cfg, seed=0):
    """A random float64 transformers model of config.json `cfg`; every parameter ~ N(0, 0.3^2)
    (norm gains 1 + N(0, 0.3^2))."""
    torch.manual_seed(seed)
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    c = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
    c._attn_implementation, c._experts_implementation = "sdpa", "eager"
    m = transformers.AutoModelForCausalLM.from_config(
        c, attn_implementation="sdpa", experts_implementation="eager"
    )
    m = m.double().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0.0, 0.3)
            if n.endswith(("norm.weight", "layernorm.weight")):
                p.add_(1.0)
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias, nonzero
                b.normal_(0.0, 0.05)
    return m


def _compare(torch, transformers, case):
    """Logits, loss and every gradient of a random transformers model and of its import:
    (max rel error of logits, of the loss, of the worst gradient, that gradient's name)."""
    cfg = CASES[case]
    ref = _hf_model(torch, transformers, cfg)
    to_hf_kw = {"rope_interleave": cfg.get("rope_interleave", True)}
    return compare_with_transformers(torch, ref, cfg, case, {"output_router_logits": False}, to_hf_kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(tf, case):
    torch, transformers = tf
    e_logits, e_loss, e_grad, worst = _compare(torch, transformers, case)
    assert e_logits <= PARITY_TOL and e_loss <= PARITY_TOL
    assert e_grad <= PARITY_TOL, worst

    # the other way: our random model, exported, run by transformers
    mine = random_model(case, seed=5)
    fresh = _hf_model(torch, transformers, CASES[case], seed=1)
    interleave = CASES[case].get("rope_interleave", True)
    sd = {
        k: torch.from_numpy(v) for k, v in hf.to_hf(mine, layout="fused", rope_interleave=interleave).items()
    }
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # the tied head is the embedding
    fresh.tie_weights()
    idx = np.random.default_rng(1).integers(0, CASES[case]["vocab_size"], (3, 12))
    with torch.no_grad():
        theirs = fresh(torch.tensor(idx)).logits.numpy()
    assert rel_error(mine.forward(idx)[0], theirs) <= PARITY_TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(tf, case):
    torch, transformers = tf
    ref = _hf_model(torch, transformers, CASES[case], seed=2)
    ref.generation_config.eos_token_id = None  # never stop early
    ref.generation_config.pad_token_id = 0
    ours = hf.from_hf(ref.state_dict(), CASES[case], dtype="float64")
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
    assert generate(ours, prompt, 10, temperature=0.0) == theirs.tolist()  # our KV cache


@pytest.mark.parametrize("case", sorted(CASES))
def test_unpatched_error_is_float32_round_off(tf_raw, case):
    """transformers' own code (float32 norms, RoPE tables and router inside a float64 model)."""
    e_logits, e_loss, e_grad, worst = _compare(*tf_raw, case)
    assert e_logits <= 1e-5 and e_loss <= 1e-5 and e_grad <= 1e-4, worst
    assert e_logits > 1e-12  # it really ran the float32 steps (else this test checks nothing new)


@pytest.mark.parametrize("case", ["qwen3_moe", "granitemoeshared", "deepseek_v3"])
def test_transformers_loads_our_folder_and_we_load_theirs(tf, tmp_path, case):
    torch, transformers = tf
    mine = random_model(case, seed=4)
    check_folder_round_trip(torch, transformers, mine, CASES[case]["vocab_size"], tmp_path)


@pytest.mark.parametrize("case", ["deepseek_v3", "qwen2_moe"])
def test_sample_hf_runs_a_family_folder(tmp_path, capsys, case):
    """`minimoe sample --hf DIR` end to end: a saved family folder with a tokenizer.json, greedy,
    prints the prompt and the tokens our KV cache (a latent cache for MLA) generates."""
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the optional tokenizers package reads tokenizer.json"
    )
    from test_hf import _write_tokenizer

    from minimoe import cli

    cfg = dict(CASES[case], vocab_size=300)  # the tokenizer's vocabulary
    model = GPT(hf.config_from_hf(cfg).replace(init_std=0.3), seed=1)
    hf.save_pretrained(model, str(tmp_path))
    _write_tokenizer(tmp_path, tokenizers)
    rc = cli.main(
        ["sample", "--hf", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0"]
    )
    out = capsys.readouterr().out
    loaded, tok = hf.load_pretrained(str(tmp_path))
    want = tok.decode(generate(loaded, tok.encode("hello"), 8, temperature=0.0))
    assert rc == 0 and out == "hello" + want + "\n"
