"""Presets and `count_params`: published totals, the toy presets' exact counts (against a built
model and against arithmetic done by hand), and their matching in active parameters per token."""

import pytest

from minimoe import GPT, PRESETS, count_params, get_preset

TOY = [name for name, d in PRESETS.items() if not d.get("counted_only")]
FULL = [name for name, d in PRESETS.items() if d.get("counted_only")]


def test_toy_and_full_presets_are_the_documented_ones():
    assert TOY == [
        "dense",
        "mixtral",
        "switch",
        "deepseek",
        "gpt4-rumoured",
        "olmoe",
        "qwen-moe",
        "deepseek-v3",
    ]
    assert set(FULL) == {
        "gpt2-124m",
        "gpt3-175b",
        "mixtral-8x7b",
        "deepseek-moe-16b",
        "olmoe-1b-7b",
        "qwen1.5-moe-a2.7b",
        "qwen3-30b-a3b",
        "granite-3.0-1b-a400m",
        "deepseek-v3-671b",
        "gpt4-rumoured-full",
    }


@pytest.mark.parametrize(
    "name, total, active, tol",
    [
        ("mixtral-8x7b", 46.7e9, 12.9e9, 0.01),  # Jiang et al. 2024
        ("deepseek-moe-16b", 16.4e9, 2.8e9, 0.03),  # Dai et al. 2024
        ("olmoe-1b-7b", 6.9e9, 1.3e9, 0.03),  # Muennighoff et al. 2024
        ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9, 0.01),  # Qwen team 2024
        ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.02),  # Qwen3 model card: we count 3.35B active
        ("granite-3.0-1b-a400m", 1.3e9, 400e6, 0.08),
        (
            "deepseek-v3-671b",
            671e9,
            37e9,
            0.015,
        ),  # DeepSeek-AI 2024: we count 671.0B and 37.6B  # IBM 2024, 1-2 significant figures: 1.34B, 429M
        ("gpt4-rumoured-full", 1.8e12, 280e9, 0.05),  # the unconfirmed 2023 leak
        ("gpt3-175b", 175e9, 175e9, 0.01),  # Brown et al. 2020 (dense: active == total)
    ],
)
def test_published_parameter_counts(name, total, active, tol):
    n = count_params(get_preset(name))
    assert n["total"] == pytest.approx(total, rel=tol)
    assert n["active"] == pytest.approx(active, rel=tol)


def test_gpt2_small_count_is_exact():
    # 124,439,808: GPT-2 small with tied embeddings and 1024 learned positions, biases included
    n = count_params(get_preset("gpt2-124m"))
    assert n["total"] == n["active"] == 124_439_808


@pytest.mark.parametrize("name", TOY)
def test_toy_count_matches_the_built_model(name):
    c = get_preset(name)
    assert count_params(c)["total"] == GPT(c).num_params()


# By hand, for the toy presets (Llama flavour: RMSNorm gains only, no biases, untied head, RoPE):
# V = 256, C = 128, 4 layers, 4 heads of 32.
V, C, L = 256, 128, 4
EMBED_HEAD_NORM = V * C + C * V + C  # token embedding, output head, final RMSNorm
ATTN_AND_NORMS = C * 3 * C + C * C + 2 * C  # wqkv, wo, two RMSNorm gains
SWIGLU = 3 * C  # weights per unit of hidden width F (w1, w3: C x F; w2: F x C)
# the deepseek-v3 preset's MLA: wq_a C x 64, its norm, wq_b 64 x 4(32 + 16), wkv_a C x (64 + 16), its norm,
# wkv_b 64 x 4(32 + 32), wo 4*32 x C; and the two RMSNorm gains of the block
MLA_AND_NORMS = C * 64 + 64 + 64 * 4 * 48 + C * 80 + 64 + 64 * 4 * 64 + 4 * 32 * C + 2 * C

ACTIVE_BY_HAND = {
    "dense": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + SWIGLU * 512),
    # 2 of 8 experts of F = 256 + router C x 8
    "mixtral": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 2 * SWIGLU * 256 + C * 8),
    # 1 of 8 experts of F = 512 + router C x 8
    "switch": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 1 * SWIGLU * 512 + C * 8),
    # 3 of 16 experts of F = 128 + 1 shared expert of F = 128 + router C x 16
    "deepseek": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 3 * SWIGLU * 128 + SWIGLU * 128 + C * 16),
    # 2 of 16 experts of F = 256 + router C x 16
    "gpt4-rumoured": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 2 * SWIGLU * 256 + C * 16),
    # 8 of 64 experts of F = 64 + router C x 64 + QK-norm gains over q and k (C each)
    "olmoe": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 8 * SWIGLU * 64 + C * 64 + 2 * C),
    # 4 of 32 experts of F = 64 + a shared expert of F = 256 + its gate C x 1 + router C x 32 + q/k/v biases
    "qwen-moe": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 4 * SWIGLU * 64 + SWIGLU * 256 + C + C * 32 + 3 * C),
    # MLA; block 0 dense (F = 512); then 7 of 32 experts of F = 64 + a shared one of F = 64 + router C x 32
    "deepseek-v3": EMBED_HEAD_NORM + L * MLA_AND_NORMS + SWIGLU * 512 + (L - 1) * (8 * SWIGLU * 64 + C * 32),
}
TOTAL_BY_HAND = {
    "dense": ACTIVE_BY_HAND["dense"],
    "mixtral": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 8 * SWIGLU * 256 + C * 8),
    "switch": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 8 * SWIGLU * 512 + C * 8),
    "deepseek": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 16 * SWIGLU * 128 + SWIGLU * 128 + C * 16),
    "gpt4-rumoured": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 16 * SWIGLU * 256 + C * 16),
    "olmoe": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 64 * SWIGLU * 64 + C * 64 + 2 * C),
    "qwen-moe": EMBED_HEAD_NORM + L * (ATTN_AND_NORMS + 32 * SWIGLU * 64 + SWIGLU * 256 + C + C * 32 + 3 * C),
    "deepseek-v3": EMBED_HEAD_NORM + L * MLA_AND_NORMS + SWIGLU * 512 + (L - 1) * (33 * SWIGLU * 64 + C * 32),
}


@pytest.mark.parametrize("name", TOY)
def test_toy_counts_by_hand(name):
    n = count_params(get_preset(name))
    assert n["active"] == ACTIVE_BY_HAND[name]
    assert n["total"] == TOTAL_BY_HAND[name]


def test_dense_flops_by_hand():
    # PaLM-style: 2 per matmul weight (head + attention + MLP; not the embedding lookup) plus
    # 4 * n_layer * T * C for attention scores and their weighted sum at T = block_size = 64.
    n = count_params(get_preset("dense"))
    matmul = C * V + L * (C * 3 * C + C * C + SWIGLU * 512)
    assert n["flops_per_token"] == 2 * matmul + 4 * L * 64 * C
    assert n["train_flops_per_token"] == 3 * n["flops_per_token"]


@pytest.mark.parametrize("name", ["mixtral", "switch", "deepseek", "gpt4-rumoured"])
def test_toy_moe_presets_match_dense_in_active_parameters(name):
    dense = count_params(get_preset("dense"))["active"]
    c = get_preset(name)
    n = count_params(c)
    # the same feed-forward weights per token; the only difference is the router's C x E per layer
    assert n["active"] - dense == L * C * c.n_experts
    assert abs(n["active"] - dense) / dense < 0.01
    assert n["total"] > 3 * dense  # ... while holding several times the parameters


@pytest.mark.parametrize("name", FULL)
def test_building_a_counted_only_preset_raises(name):
    with pytest.raises(ValueError, match="count") as e:
        GPT(get_preset(name))
    assert "\n" not in str(e.value)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        get_preset("mixtral-8x22b")
    msg = str(e.value)
    assert "mixtral-8x22b" in msg and "\n" not in msg
    for name in PRESETS:
        assert name in msg


def test_overrides_apply():
    c = get_preset("mixtral", n_layer=2, vocab_size=65)
    assert (c.n_layer, c.vocab_size, c.n_experts, c.top_k, c.name) == (2, 65, 8, 2, "mixtral")
