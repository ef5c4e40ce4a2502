"""Hugging Face import/export (minimoe/hf/) and the safetensors format (minimoe/safetensors.py).

Without torch: the name/layout maps on synthetic numpy state dicts, the safetensors reader and
writer on files written here, local folders, and the config fields we refuse.
With torch + transformers (the `compare` extra; skipped otherwise): random tiny GPT-2 and
Mixtral models built in transformers, float64 on both sides, must agree with ours in logits,
loss, every parameter's gradient (max rel error <= 1e-8 per tensor) and greedy generation.
"""

import json
import os
import struct

import numpy as np
import pytest
from conftest import array_equal

from minimoe import GPT, Config, hf
from minimoe.gradcheck import rel_error
from minimoe.layers.attention import KVCache

PARITY_TOL = 1e-8

GPT2_CFG = dict(model_type="gpt2", vocab_size=29, n_positions=16, n_embd=12, n_layer=2, n_head=3, n_inner=20,
                activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.1, embd_pdrop=0.1,
                attn_pdrop=0.1, bos_token_id=None, eos_token_id=None)  # fmt: skip
MIXTRAL_CFG = dict(model_type="mixtral", vocab_size=31, hidden_size=16, intermediate_size=12,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=16, num_local_experts=4, num_experts_per_tok=2,
                   rope_theta=1000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
                   eos_token_id=None)  # fmt: skip


def gpt2_state_dict(cfg, rng):
    """Random numpy weights under GPT-2's names and shapes (Conv1D: (in, out))."""
    C, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    F = cfg.get("n_inner") or 4 * C
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C)}
    for i in range(cfg["n_layer"]):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
                       h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
                       h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                       h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                       h + "mlp.c_fc.weight": (C, F), h + "mlp.c_fc.bias": (F,),
                       h + "mlp.c_proj.weight": (F, C), h + "mlp.c_proj.bias": (C,)})  # fmt: skip
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (V, C)
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def mixtral_state_dict(cfg, rng):
    """Random numpy weights under Mixtral's checkpoint names and shapes (nn.Linear: (out, in))."""
    C, V, F, E = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = C // H
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(cfg["num_hidden_layers"]):
        h = f"model.layers.{i}."
        a, x = h + "self_attn.", h + "block_sparse_moe."
        shapes.update({h + "input_layernorm.weight": (C,), a + "q_proj.weight": (H * D, C),
                       a + "k_proj.weight": (Hkv * D, C), a + "v_proj.weight": (Hkv * D, C),
                       a + "o_proj.weight": (C, H * D), h + "post_attention_layernorm.weight": (C,),
                       x + "gate.weight": (E, C)})  # fmt: skip
        for e in range(E):
            shapes.update({f"{x}experts.{e}.w1.weight": (F, C), f"{x}experts.{e}.w3.weight": (F, C),
                           f"{x}experts.{e}.w2.weight": (C, F)})  # fmt: skip
    shapes["model.norm.weight"] = (C,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, C)
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def fused(sd, cfg):
    """The transformers >= 5 module names of a Mixtral checkpoint state dict, built independently."""
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    for i in range(cfg["num_hidden_layers"]):
        x, m = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        E = range(cfg["num_local_experts"])
        out[m + "gate.weight"] = sd[x + "gate.weight"]
        out[m + "experts.gate_up_proj"] = np.stack(
            [np.concatenate([sd[f"{x}experts.{e}.w1.weight"], sd[f"{x}experts.{e}.w3.weight"]]) for e in E]
        )
        out[m + "experts.down_proj"] = np.stack([sd[f"{x}experts.{e}.w2.weight"] for e in E])
    return out


CASES = {  # name -> (config.json, state-dict maker)
    "gpt2": (GPT2_CFG, gpt2_state_dict),
    "gpt2-exact-gelu-untied": (
        dict(GPT2_CFG, activation_function="gelu", tie_word_embeddings=False, n_inner=None),
        gpt2_state_dict,
    ),
    "mixtral": (MIXTRAL_CFG, mixtral_state_dict),
    "mixtral-mqa-tied-top3": (
        dict(MIXTRAL_CFG, num_key_value_heads=1, num_experts_per_tok=3, tie_word_embeddings=True),
        mixtral_state_dict,
    ),
}


# ---------------------------------------------------------------------------------------------
# Name and layout maps (no torch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_returns_the_same_arrays(case):
    cfg, make = CASES[case]
    sd = make(cfg, np.random.default_rng(0))
    model = hf.from_hf(sd, cfg, dtype="float64")
    back = hf.to_hf(model)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == np.float64 and array_equal(back[k], sd[k]), k


def test_gpt2_layout_is_copied_and_tied():
    cfg = GPT2_CFG
    sd = gpt2_state_dict(cfg, np.random.default_rng(1))
    model = hf.from_hf(sd, cfg, dtype="float64")
    p = model.params
    assert model.config.tie_embeddings and "lm_head" not in p
    assert (
        model.config.activation == "gelu" and model.config.block_size == 16 and model.config.ffn_hidden == 20
    )
    assert array_equal(p["blocks.1.attn.wqkv"], sd["transformer.h.1.attn.c_attn.weight"])  # (C, 3C) as is
    assert array_equal(p["blocks.0.mlp.w2"], sd["transformer.h.0.mlp.c_proj.weight"])
    assert array_equal(p["wpe"], sd["transformer.wpe.weight"])
    # a bare GPT2Model / old Hub checkpoint: no "transformer." prefix, causal-mask buffers, a tied lm_head
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16)))
    bare["h.0.attn.masked_bias"] = np.array(-1e4)
    bare["lm_head.weight"] = sd["transformer.wte.weight"]
    model2 = hf.from_hf(bare, cfg, dtype="float64")
    assert all(array_equal(model2.params[k], p[k]) for k in p)


def test_mixtral_layout_is_transposed_and_stacked():
    cfg = MIXTRAL_CFG
    sd = mixtral_state_dict(cfg, np.random.default_rng(2))
    model = hf.from_hf(sd, cfg, dtype="float64")
    p, c = model.params, model.config
    H, Hkv, D = 4, 2, 4
    a, x = "model.layers.1.self_attn.", "model.layers.1.block_sparse_moe."
    wqkv = p["blocks.1.attn.wqkv"]  # (C, (H + 2 Hkv) D) = [q | k | v]
    assert wqkv.shape == (16, (H + 2 * Hkv) * D)
    assert array_equal(wqkv[:, : H * D], sd[a + "q_proj.weight"].T)
    assert array_equal(wqkv[:, H * D : (H + Hkv) * D], sd[a + "k_proj.weight"].T)
    assert array_equal(wqkv[:, (H + Hkv) * D :], sd[a + "v_proj.weight"].T)
    assert array_equal(p["blocks.1.attn.wo"], sd[a + "o_proj.weight"].T)
    assert array_equal(p["blocks.1.moe.router.w"], sd[x + "gate.weight"].T)  # (C, E)
    assert array_equal(p["blocks.1.moe.experts.w1"][3], sd[x + "experts.3.w1.weight"].T)  # (C, F)
    assert array_equal(p["blocks.1.moe.experts.w3"][2], sd[x + "experts.2.w3.weight"].T)
    assert array_equal(p["blocks.1.moe.experts.w2"][1], sd[x + "experts.1.w2.weight"].T)  # (F, C)
    assert array_equal(p["lm_head"], sd["lm_head.weight"].T)
    assert (c.n_experts, c.top_k, c.n_kv_head, c.rope_theta, c.norm_eps) == (4, 2, 2, 1000.0, 1e-6)
    assert c.renormalize and c.router == "softmax" and c.capacity_factor == 0 and c.aux_loss_coef == 0.001


def test_mixtral_reads_and_writes_the_fused_transformers5_names():
    cfg = MIXTRAL_CFG
    sd = mixtral_state_dict(cfg, np.random.default_rng(3))
    a = hf.from_hf(sd, cfg, dtype="float64")
    b = hf.from_hf(fused(sd, cfg), cfg, dtype="float64")
    assert all(array_equal(a.params[k], b.params[k]) for k in a.params)
    out, want = hf.to_hf(a, layout="fused"), fused(sd, cfg)
    assert sorted(out) == sorted(want) and all(array_equal(out[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="layout"):
        hf.to_hf(a, layout="interleaved")


def test_dtype_and_eval_mode():
    sd = gpt2_state_dict(GPT2_CFG, np.random.default_rng(4))
    m32 = hf.from_hf(sd, GPT2_CFG)
    assert m32.dtype == "float32" and m32.params["wte"].dtype == np.float32 and not m32.training
    assert m32.config.dropout == 0.0  # inference import: training-only dropout is not kept
    assert hf.to_hf(m32)["transformer.wte.weight"].dtype == np.float32
    assert hf.from_hf(sd, GPT2_CFG, dtype=np.float64).dtype == "float64"
    with pytest.raises(ValueError, match="dtype"):
        hf.from_hf(sd, GPT2_CFG, dtype="bfloat16")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_config_round_trip(case):
    cfg, _ = CASES[case]
    c = hf.config_from_hf(cfg)
    again = hf.config_from_hf(hf.hf_config_from(c))
    assert again.replace(name="") == c.replace(name="")


def test_grads_are_exported_under_hf_names():
    cfg = MIXTRAL_CFG
    model = hf.from_hf(mixtral_state_dict(cfg, np.random.default_rng(5)), cfg, dtype="float64")
    with pytest.raises(ValueError, match="backward"):
        hf.to_hf(model, grads=True)
    idx = np.random.default_rng(0).integers(0, 31, (2, 8))
    model.forward(idx, idx)
    model.backward()
    g = hf.to_hf(model, grads=True)
    assert sorted(g) == sorted(hf.to_hf(model))
    a = "model.layers.0.self_attn."
    assert array_equal(g[a + "k_proj.weight"], model.grads["blocks.0.attn.wqkv"][:, 16:24].T)


def test_tied_gpt2_gradient_holds_both_uses():
    sd = gpt2_state_dict(GPT2_CFG, np.random.default_rng(6))
    model = hf.from_hf(sd, GPT2_CFG, dtype="float64")
    idx = np.random.default_rng(1).integers(0, 29, (2, 8))
    model.forward(idx, idx)
    model.backward()
    g = hf.to_hf(model, grads=True)
    assert "lm_head.weight" not in g
    # the tokens never seen as input still get a gradient: through the output head
    unseen = sorted(set(range(29)) - set(idx.ravel().tolist()))
    assert unseen and np.abs(g["transformer.wte.weight"][unseen]).max() > 0


# ---------------------------------------------------------------------------------------------
# Refused configs and state dicts
# ---------------------------------------------------------------------------------------------

REFUSED = [
    ("gpt2", dict(model_type="bert"), {}, "model_type"),
    ("gpt2", dict(activation_function="relu"), {}, "activation_function"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), {}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(scale_attn_weights=False), {}, "scale_attn_weights"),
    ("gpt2", dict(add_cross_attention=True), {}, "add_cross_attention"),
    ("gpt2", dict(n_head=5), {}, "n_head"),
    ("gpt2", dict(), dict(training=True), "attn_pdrop"),
    ("gpt2", dict(attn_pdrop=0.0, embd_pdrop=0.2), dict(training=True), "embd_pdrop"),
    ("mixtral", dict(hidden_act="gelu"), {}, "hidden_act"),
    ("mixtral", dict(head_dim=3), {}, "head_dim"),  # RoPE needs an even head size
    ("mixtral", dict(rope_scaling={"type": "linear", "factor": 2.0}), {}, "rope_scaling"),
    ("mixtral", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), {}, "rope_type"),
    ("mixtral", dict(attention_bias=True), {}, "attention_bias"),
    ("mixtral", dict(mlp_bias=True), {}, "mlp_bias"),
    ("mixtral", dict(num_experts_per_tok=5), {}, "num_experts_per_tok"),
    ("mixtral", dict(num_key_value_heads=3), {}, "num_key_value_heads"),
    ("mixtral", dict(attention_dropout=0.1), dict(training=True), "attention_dropout"),
]


@pytest.mark.parametrize("kind, change, kw, field", REFUSED)
def test_unrepresentable_configs_are_refused_naming_the_field(kind, change, kw, field):
    cfg = dict(GPT2_CFG if kind == "gpt2" else MIXTRAL_CFG, **change)
    with pytest.raises(ValueError, match=field):
        hf.config_from_hf(cfg, **kw)


def test_training_only_fields_are_kept_or_ignored():
    assert (
        hf.config_from_hf(dict(MIXTRAL_CFG, router_jitter_noise=0.01)).n_experts == 4
    )  # inference: no jitter
    c = hf.config_from_hf(dict(GPT2_CFG, attn_pdrop=0.0), training=True)
    assert c.dropout == 0.1
    c = hf.config_from_hf(dict(MIXTRAL_CFG, router_jitter_noise=0.01), training=True)
    assert c.router_jitter == 0.01 and c.jitter_scope == "moe"  # Mixtral jitters the whole MoE input


def test_sliding_window_caps_the_context():
    cfg = dict(MIXTRAL_CFG, sliding_window=6)
    model = hf.from_hf(mixtral_state_dict(cfg, np.random.default_rng(7)), cfg)
    assert model.config.block_size == 6  # full attention is exact up to the window ...
    model.forward(np.zeros((1, 6), dtype=np.int64))
    with pytest.raises(ValueError, match="block_size"):  # ... and longer sequences are refused
        model.forward(np.zeros((1, 7), dtype=np.int64))
    assert hf.config_from_hf(dict(MIXTRAL_CFG, sliding_window=64)).block_size == 16


def test_bad_state_dicts_are_refused():
    cfg = MIXTRAL_CFG
    sd = mixtral_state_dict(cfg, np.random.default_rng(8))
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    with pytest.raises(ValueError, match="experts.2.w3"):
        hf.from_hf(missing, cfg)
    with pytest.raises(ValueError, match="o_proj"):
        hf.from_hf(dict(sd, **{"model.layers.0.self_attn.o_proj.weight": np.zeros((16, 8))}), cfg)
    with pytest.raises(ValueError, match="does not use"):
        hf.from_hf(dict(sd, **{"model.layers.2.input_layernorm.weight": np.ones(16)}), cfg)
    tied = dict(MIXTRAL_CFG, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head"):
        hf.from_hf(sd, tied)  # lm_head.weight differs from the embedding


@pytest.mark.parametrize(
    "change, field",
    [(dict(router="noisy"), "router"), (dict(capacity_factor=1.25), "capacity_factor"),
     (dict(n_shared_experts=1), "n_shared_experts"), (dict(moe_every=2), "moe_every"),
     (dict(n_experts=0), "n_experts"), (dict(z_loss_coef=0.001), "z_loss_coef")],
)  # fmt: skip
def test_export_refuses_what_mixtral_lacks(change, field):
    base = dict(flavour="llama", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, n_experts=4)
    with pytest.raises(ValueError, match=field):
        hf.hf_config_from(Config(**dict(base, **change)))
    with pytest.raises(ValueError, match="n_experts"):
        hf.hf_config_from(Config(flavour="gpt2", n_experts=4))


# ---------------------------------------------------------------------------------------------
# safetensors and local folders (no torch)
# ---------------------------------------------------------------------------------------------


def write_by_hand(path, entries, header_extra=None):
    """A safetensors file from name -> (dtype, shape, raw bytes), written without minimoe."""
    header, blob = {"__metadata__": {"format": "pt"}}, b""
    for name, (dt, shape, raw) in entries.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    header.update(header_extra or {})
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blob)


def test_safetensors_reader_all_dtypes(tmp_path):
    bf16_bits = np.array([0x3F80, 0xC020, 0x3E20, 0x3F81, 0x0000, 0xFF80], dtype="<u2")
    bf16_vals = np.array([1.0, -2.5, 0.15625, 1.0078125, 0.0, -np.inf], dtype=np.float32)
    f64 = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    f32 = np.linspace(-1, 1, 5, dtype=np.float32)
    f16 = np.array([[0.5, -3.0], [1e-3, 6e4]], dtype=np.float16)
    ids = np.array([3, -1, 2**40], dtype=np.int64)
    path = str(tmp_path / "t.safetensors")
    write_by_hand(path, {
        "odd": ("U8", (3,), bytes([1, 2, 3])),  # 3 bytes: every later tensor starts unaligned
        "bf16": ("BF16", (2, 3), bf16_bits.tobytes()),
        "f64": ("F64", (2, 3), f64.astype("<f8").tobytes()),
        "f32": ("F32", (5,), f32.astype("<f4").tobytes()),
        "f16": ("F16", (2, 2), f16.astype("<f2").tobytes()),
        "i64": ("I64", (3,), ids.astype("<i8").tobytes()),
        "scalar": ("F32", (), np.float32(2.5).tobytes()),
        "empty": ("F32", (0, 4), b""),
    })  # fmt: skip
    t = hf.read_safetensors(path)
    assert sorted(t) == ["bf16", "empty", "f16", "f32", "f64", "i64", "odd", "scalar"]
    assert t["bf16"].dtype == np.float32 and array_equal(t["bf16"], bf16_vals.reshape(2, 3))
    assert t["f64"].dtype == np.float64 and array_equal(t["f64"], f64)
    assert t["f32"].dtype == np.float32 and array_equal(t["f32"], f32)
    assert t["f16"].dtype == np.float16 and array_equal(t["f16"], f16)
    assert array_equal(t["i64"], ids) and array_equal(t["odd"], [1, 2, 3])
    assert t["scalar"].shape == () and t["scalar"] == 2.5 and t["empty"].shape == (0, 4)
    t["f32"][0] = 7.0  # arrays are ordinary writable copies, not views of the file


def test_safetensors_reader_refuses_broken_files(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        hf.read_safetensors(path)
    write_by_hand(path, {"x": ("F32", (3,), b"\0" * 8)})
    with pytest.raises(ValueError, match="needs 12"):
        hf.read_safetensors(path)
    write_by_hand(path, {"x": ("F8_E4M3", (2,), b"\0\0")})
    with pytest.raises(ValueError, match="F8_E4M3"):
        hf.read_safetensors(path)


def test_safetensors_writer_round_trip(tmp_path):
    arrays = {"a": np.random.default_rng(0).standard_normal((3, 4)), "b": np.arange(5, dtype=np.int32),
              "c": np.ones((2, 1), dtype=np.float16), "d": np.array([True, False])}  # fmt: skip
    path = str(tmp_path / "w.safetensors")
    hf.write_safetensors(path, arrays, {"format": "pt"})
    back = hf.read_safetensors(path)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and array_equal(back[k], v)
    with open(path, "rb") as f:
        assert struct.unpack("<Q", f.read(8))[0] % 8 == 0  # data starts 8-byte aligned
    with pytest.raises(ValueError, match="complex"):
        hf.write_safetensors(path, {"z": np.zeros(2, dtype=np.complex64)})


def test_safetensors_agrees_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip(
        "safetensors.numpy", reason="cross-check against the optional safetensors package"
    )
    arrays = {"w": np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32), "i": np.arange(4)}
    st.save_file(arrays, str(tmp_path / "theirs.safetensors"))
    ours = hf.read_safetensors(str(tmp_path / "theirs.safetensors"))
    hf.write_safetensors(str(tmp_path / "ours.safetensors"), arrays)
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in arrays.items():
        assert array_equal(ours[k], v) and array_equal(theirs[k], v)


def test_load_pretrained_sharded_folder(tmp_path):
    cfg = MIXTRAL_CFG
    sd = {k: v.astype(np.float32) for k, v in mixtral_state_dict(cfg, np.random.default_rng(9)).items()}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        hf.write_safetensors(str(tmp_path / file), {k: sd[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, tok = hf.load_pretrained(str(tmp_path))
    assert tok is None  # no tokenizer.json
    want = hf.from_hf(sd, cfg)
    assert all(array_equal(model.params[k], want.params[k]) for k in want.params)
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"  # a wrong index
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not hold"):
        hf.load_pretrained(str(tmp_path))


def test_save_then_load_pretrained(tmp_path):
    model = GPT(Config(flavour="gpt2", vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=3)
    hf.save_pretrained(model, str(tmp_path))
    again, _ = hf.load_pretrained(str(tmp_path))
    assert again.config.replace(name="") == model.config.replace(name="")
    assert all(array_equal(again.params[k], model.params[k]) for k in model.params)
    with pytest.raises(ValueError, match="config.json"):
        hf.load_pretrained(str(tmp_path / "nowhere"))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        hf.load_pretrained(str(tmp_path))


def test_a_users_bad_files_and_configs_are_user_errors(tmp_path):
    # the command line turns exactly these (UserError) into one `error:` line for `sample --hf DIR`
    from minimoe.errors import CheckpointError, ConfigError

    with pytest.raises(CheckpointError, match="config.json"):
        hf.load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps(dict(GPT2_CFG, activation_function="relu")))
    with pytest.raises(ConfigError, match="activation_function"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 99) + b"{}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        hf.read_safetensors(str(tmp_path / "model.safetensors"))
    sd = gpt2_state_dict(GPT2_CFG, np.random.default_rng(0))
    with pytest.raises(CheckpointError, match="transformer.h.1.ln_1.bias"):
        hf.from_hf({k: v for k, v in sd.items() if k != "transformer.h.1.ln_1.bias"}, GPT2_CFG)
    with pytest.raises(ConfigError, match="n_shared_experts"):
        hf.hf_config_from(Config(flavour="llama", n_embd=8, n_head=2, n_experts=4, n_shared_experts=1))


def _write_tokenizer(path, tokenizers):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, hello tokens", "the world says hello"] * 10, trainer)
    tok.save(str(path / "tokenizer.json"))


def test_load_pretrained_wraps_tokenizer_json(tmp_path, monkeypatch):
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the optional tokenizers package reads tokenizer.json"
    )
    model = GPT(Config(flavour="gpt2", vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=8))
    hf.save_pretrained(model, str(tmp_path))
    _write_tokenizer(tmp_path, tokenizers)
    _, tok = hf.load_pretrained(str(tmp_path))
    ids = tok.encode("hello world, héllo")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids) and len(ids) < 18
    assert tok.decode(ids) == "hello world, héllo"
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as if not installed
    assert hf.load_pretrained(str(tmp_path))[1] is None


# ---------------------------------------------------------------------------------------------
# Parity with transformers (float64 on both sides)
# ---------------------------------------------------------------------------------------------


def patch_float32_steps(torch, monkeypatch, modules, router_forward=None):
    """Replace transformers' deliberate float32 steps by the same formulas in the input's dtype,
    in the modeling modules named (e.g. ["mixtral"]): every *RMSNorm, *RotaryEmbedding and
    *TopKRouter class's forward. router_forward(module_name, class_name) may return another
    router forward (Granite's, DeepSeek-V3's); the default is softmax over all E, top-k, and
    renormalised when the router says so (Mixtral always does). Also used by test_hf_families.py.
    """
    import importlib

    F = torch.nn.functional

    def rmsnorm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        D = 2 * self.inv_freq.shape[0]
        inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2).double() / D)
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def softmax_router(self, h):
        logits = F.linear(h.reshape(-1, self.hidden_dim), self.weight)
        top, idx = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, idx

    for name in modules:
        mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        for attr in dir(mod):
            cls = getattr(mod, attr)
            if not isinstance(cls, type) or not cls.__module__ == mod.__name__:
                continue
            other = router_forward(name, attr) if router_forward is not None else None
            if other is not None:
                monkeypatch.setattr(cls, "forward", other)
            elif attr.endswith("RMSNorm"):
                monkeypatch.setattr(cls, "forward", rmsnorm)
            elif attr.endswith("RotaryEmbedding"):
                monkeypatch.setattr(cls, "forward", rotary)
            elif attr.endswith("TopKRouter"):
                monkeypatch.setattr(cls, "forward", softmax_router)


@pytest.fixture
def tf(tf_raw, monkeypatch):
    """(torch, transformers), with Mixtral's deliberate float32 steps removed for float64 runs.

    transformers computes Mixtral's RMSNorm, RoPE tables and router softmax in float32 whatever
    the model's dtype (`.float()`/`.to(torch.float32)`), which alone gives ~1e-7 differences.
    We replace those three forwards by the same formulas in the input's dtype (and use SDPA
    attention, whose softmax keeps float64, and the eager loop over experts).
    test_unpatched_mixtral_agrees_to_float32_round_off runs transformers' own code.
    """
    torch, transformers = tf_raw
    from transformers.models.mixtral import modeling_mixtral as mm

    if not hasattr(mm, "MixtralTopKRouter"):
        pytest.skip("the float64 patches target transformers >= 5 (MixtralTopKRouter)")
    patch_float32_steps(torch, monkeypatch, ["mixtral"])
    return tf_raw


def _hf_model(torch, transformers, cfg, seed=0):
    """A random float64 transformers model of config.json `cfg`; every parameter ~ N(0, 0.3^2)."""
    torch.manual_seed(seed)
    if cfg["model_type"] == "gpt2":
        c = transformers.GPT2Config(**{k: v for k, v in cfg.items() if k != "model_type"},
                                    attn_implementation="eager")  # fmt: skip
        c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = 0.0
        m = transformers.GPT2LMHeadModel(c)
    else:
        kw = {k: v for k, v in cfg.items() if k != "model_type"}
        c = transformers.MixtralConfig(**kw, attn_implementation="sdpa", experts_implementation="eager")
        m = transformers.MixtralForCausalLM(c)
    m = m.double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _greedy(model, prompt, n):
    """Our greedy continuation with the KV cache: minimoe.sample.generate when present."""
    try:
        from minimoe.sample import generate
    except ImportError:
        generate = None
    if generate is not None:
        return generate(model, prompt, n, temperature=0.0)
    c = model.config
    cache = KVCache(c.n_layer, 1, c.n_kv_head, len(prompt) + n, c.head_size, dtype=model.dtype)
    logits, _ = model.forward(np.array([prompt]), kv_cache=cache)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[0, -1])))
        logits, _ = model.forward(np.array([[out[-1]]]), kv_cache=cache)
    return out


def _compare(torch, transformers, case):
    """Logits, loss and every gradient of a random transformers model and of its import:
    (max rel error of logits, of the loss, of the worst gradient, that gradient's name)."""
    cfg, _ = CASES[case]
    ref = _hf_model(torch, transformers, cfg)
    forward_kw = {"output_router_logits": False} if "mixtral" in case else {}
    return compare_with_transformers(torch, ref, cfg, case, forward_kw)


def compare_with_transformers(torch, ref, cfg, case, forward_kw=None, to_hf_kw=None):
    """Import the transformers model `ref` (config.json dict cfg) in float64, run both on the same
    tokens, backpropagate the LM loss in both: (max rel error of logits, of the loss, of the worst
    gradient, that gradient's name). Also used by test_hf_families.py."""
    ours = hf.from_hf(ref.state_dict(), cfg, dtype="float64")  # torch tensors are accepted
    ours.config.aux_loss_coef = 0.0  # LM loss only on both sides (output_router_logits=False)
    V = cfg["vocab_size"]
    tokens = np.random.default_rng(1).integers(0, V, (3, 13))
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    out = ref(torch.tensor(idx), **(forward_kw or {}))
    ref_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), torch.tensor(targets).reshape(-1))
    ref_loss.backward()
    logits, loss = ours.forward(idx, targets)
    ours.backward()
    grads = hf.to_hf(ours, grads=True, layout="fused", **(to_hf_kw or {}))
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}  # a tied head appears once
    assert sorted(grads) == sorted(ref_grads)
    errs = {n: rel_error(grads[n], ref_grads[n]) for n in ref_grads}
    e_logits = rel_error(logits, out.logits.detach().numpy())
    e_loss = abs(float(loss) - ref_loss.item()) / ref_loss.item()
    worst = max(errs, key=errs.get)
    print(f"\n{case}: logits {e_logits:.1e}  loss {e_loss:.1e}  grads {errs[worst]:.1e} ({worst})")
    return e_logits, e_loss, errs[worst], worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(tf, case):
    torch, transformers = tf
    cfg, _ = CASES[case]
    e_logits, e_loss, e_grad, worst = _compare(torch, transformers, case)
    assert e_logits <= PARITY_TOL and e_loss <= PARITY_TOL
    assert e_grad <= PARITY_TOL, worst

    # the other way: our random model, exported, run by transformers
    mine = GPT(hf.config_from_hf(cfg).replace(init_std=0.3), seed=5, dtype="float64")
    fresh = _hf_model(torch, transformers, cfg, seed=1)
    sd = {k: torch.from_numpy(v) for k, v in hf.to_hf(mine, layout="fused").items()}
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # the tied head is the embedding
    fresh.tie_weights()
    idx = np.random.default_rng(1).integers(0, cfg["vocab_size"], (3, 12))
    with torch.no_grad():
        theirs = fresh(torch.tensor(idx)).logits.numpy()
    assert rel_error(mine.forward(idx)[0], theirs) <= PARITY_TOL


def test_unpatched_mixtral_agrees_to_float32_round_off(tf_raw):
    """transformers' own Mixtral code (float32 norm, RoPE and router inside a float64 model)."""
    e_logits, e_loss, e_grad, worst = _compare(*tf_raw, "mixtral")
    assert e_logits <= 1e-5 and e_loss <= 1e-5 and e_grad <= 1e-5, worst
    assert e_logits > 1e-12  # it really ran the float32 steps (else this test checks nothing new)


@pytest.mark.parametrize("case", ["gpt2", "mixtral", "mixtral-mqa-tied-top3"])
def test_greedy_generation_matches_transformers(tf, case):
    torch, transformers = tf
    cfg, _ = CASES[case]
    ref = _hf_model(torch, transformers, cfg, seed=2)
    ref.generation_config.eos_token_id = None  # never stop early
    ref.generation_config.pad_token_id = 0
    ours = hf.from_hf(ref.state_dict(), cfg, dtype="float64")
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
    assert _greedy(ours, prompt, 10) == theirs.tolist()


def check_folder_round_trip(torch, transformers, mine, vocab_size, tmp_path):
    """Our model saved as a Hugging Face folder loads in transformers with the same logits, and
    transformers' bf16 save of it loads back in minimoe with the same (bf16) weights. Also used by
    test_hf_families.py."""
    hf.save_pretrained(mine, str(tmp_path / "ours"))  # checkpoint names, as on the Hub
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "ours"),
        dtype=torch.float64,
        attn_implementation="sdpa",
        experts_implementation="eager",
    ).eval()
    idx = np.random.default_rng(2).integers(0, vocab_size, (2, 9))
    with torch.no_grad():
        assert rel_error(mine.forward(idx)[0], ref(torch.tensor(idx)).logits.numpy()) <= PARITY_TOL
    ref.to(torch.bfloat16).save_pretrained(str(tmp_path / "theirs"))  # bf16 safetensors
    back, _ = hf.load_pretrained(str(tmp_path / "theirs"), dtype="float64")
    want = {k: v.float().double().numpy() for k, v in ref.state_dict().items()}
    got = hf.to_hf(back, layout="fused")
    assert sorted(got) == sorted(want) and all(array_equal(got[k], want[k]) for k in want)


def test_transformers_loads_our_folder_and_we_load_theirs(tf, tmp_path):
    torch, transformers = tf
    cfg = CASES["mixtral"][0]
    mine = GPT(hf.config_from_hf(cfg), seed=4, dtype="float64")
    check_folder_round_trip(torch, transformers, mine, cfg["vocab_size"], tmp_path)
