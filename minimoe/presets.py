"""Named configurations, and counting parameters and FLOPs without building a model.

Toy presets (they train on a laptop; all at nanoGPT's laptop size: 4 layers, 4 heads, 128 wide,
block 64) are MATCHED IN ACTIVE PARAMETERS PER TOKEN: every feed-forward block spends the same
3 * C * 512 = 196,608 weights on each token (SwiGLU has three C x F matrices), so dense vs MoE
comparisons give both the same compute per token, and the MoE models more capacity. The family
presets (olmoe, qwen-moe) keep that budget; their few extra active weights (router, QK-norm gains,
biases, a gate) are listed beside each.

Published full-size presets (counted_only=True) are only for `count_params`; building one
raises an error.
"""

from __future__ import annotations

from minimoe.config import Config
from minimoe.errors import ConfigError

_TOY = dict(flavour="llama", block_size=64, n_layer=4, n_head=4, n_embd=128, vocab_size=256)

PRESETS = {
    # Dense Llama-style baseline: SwiGLU MLP with F = 512 -> 3*128*512 = 196,608 FFN weights/token.
    "dense": dict(_TOY, ffn_hidden=512),
    # Mixtral-style: 8 SwiGLU experts of F = 256, top-2, renormalised softmax over the chosen 2.
    # Active FFN weights per token: 2 experts * 3*128*256 = 196,608 (= dense) + router 128*8.
    "mixtral": dict(
        _TOY, n_experts=8, top_k=2, expert_hidden=256, router="softmax", renormalize=True, aux_loss_coef=0.01
    ),
    # Switch-style: 8 experts of F = 512, top-1, gate = p (NOT renormalised: with k=1 a
    # renormalised gate is always 1 and the router would get no gradient), capacity factor 1.25.
    # Active: 1 * 3*128*512 = 196,608 (= dense) + router.
    "switch": dict(
        _TOY,
        n_experts=8,
        top_k=1,
        expert_hidden=512,
        router="softmax",
        renormalize=False,
        capacity_factor=1.25,
        aux_loss_coef=0.01,
    ),
    # DeepSeekMoE-style fine-grained + shared experts with DeepSeek-V3's bias balancing: each
    # Mixtral expert split in 2 (16 experts of F = 128), top-3 routed + 1 always-on shared expert
    # of F = 128. Active: (3 + 1) * 3*128*128 = 196,608 (= dense) + router. No balancing loss:
    # the selection bias balances the load.
    "deepseek": dict(
        _TOY,
        n_experts=16,
        top_k=3,
        expert_hidden=128,
        n_shared_experts=1,
        shared_hidden=128,
        router="sigmoid_bias",
        aux_loss_coef=0.0,
        bias_update_rate=1e-3,
    ),
    # The rumoured GPT-4 layout at toy scale: 16 experts, top-2, F = 256.
    # Active: 2 * 3*128*256 = 196,608 (= dense) + router.
    "gpt4-rumoured": dict(
        _TOY, n_experts=16, top_k=2, expert_hidden=256, router="softmax", renormalize=True, aux_loss_coef=0.01
    ),
    # OLMoE-style (Muennighoff et al. 2024): many small experts, top-8 of 64 of F = 64, gates NOT
    # renormalised, QK-norm over the whole q and k projections, a z-loss. Active FFN weights per
    # token: 8 * 3*128*64 = 196,608 (= dense) + router 128*64 + QK-norm gains 2*128.
    "olmoe": dict(_TOY, n_experts=64, top_k=8, expert_hidden=64, router="softmax", renormalize=False,
                  qk_norm="full", aux_loss_coef=0.01, z_loss_coef=0.001),
    # Qwen1.5-MoE-style (Qwen team 2024): top-4 of 32 routed experts of F = 64 plus one shared
    # expert of F = 256 (four routed experts' worth, as in Qwen1.5-MoE) behind a sigmoid gate per
    # token, gates not renormalised, biases on q, k, v only. Active: (4*64 + 256) * 3*128 =
    # 196,608 (= dense) + router 128*32 + shared gate 128 + q/k/v biases 3*128.
    "qwen-moe": dict(_TOY, n_experts=32, top_k=4, expert_hidden=64, n_shared_experts=1, shared_hidden=256,
                     shared_gate=True, router="softmax", renormalize=False, qkv_bias=True, aux_loss_coef=0.01),
    # DeepSeek-V3-style (DeepSeek-AI 2024): Multi-head Latent Attention (query latent 64, key/value
    # latent 64, RoPE part 16: 63,488 attention weights per block against MHA's 65,536), the first
    # block dense (F = 512), then top-7 of 32 routed experts of F = 64 chosen within the best 4 of 8
    # groups, plus one shared expert of F = 64; sigmoid gates renormalised and scaled by 2.5, the
    # load balanced by the selection bias (no balancing loss). Active FFN weights per token:
    # (7 + 1) * 3*128*64 = 196,608 (= dense) + router 128*32 in the MoE blocks.
    "deepseek-v3": dict(_TOY, attention="mla", q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                        qk_rope_head_dim=16, v_head_dim=32, ffn_hidden=512, first_dense=1, n_experts=32, top_k=7,
                        expert_hidden=64, n_shared_experts=1, shared_hidden=64, router="sigmoid_bias", n_group=8,
                        topk_group=4, routed_scaling_factor=2.5, aux_loss_coef=0.0, bias_update_rate=1e-3),
    # ---------------- published full-size configurations: counted, never built ----------------
    # GPT-2 small (Radford et al. 2019), 124M.
    "gpt2-124m": dict(
        flavour="gpt2",
        vocab_size=50257,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        counted_only=True,
    ),
    # GPT-3 175B (Brown et al. 2020, table 2.1).
    "gpt3-175b": dict(
        flavour="gpt2",
        vocab_size=50257,
        block_size=2048,
        n_layer=96,
        n_head=96,
        n_embd=12288,
        counted_only=True,
    ),
    # Mixtral 8x7B (Jiang et al. 2024; its config.json): 46.7B total, 12.9B active.
    "mixtral-8x7b": dict(
        flavour="llama",
        vocab_size=32000,
        block_size=32768,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        n_embd=4096,
        ffn_hidden=14336,
        n_experts=8,
        top_k=2,
        rope_theta=1e6,
        counted_only=True,
    ),
    # DeepSeekMoE 16B (Dai et al. 2024): first block dense (F = 10944), then 64 fine-grained experts
    # (F = 1408), top-6, plus 2 shared experts; 16.4B total, 2.8B active.
    "deepseek-moe-16b": dict(
        flavour="llama",
        vocab_size=102400,
        block_size=4096,
        n_layer=28,
        n_head=16,
        n_embd=2048,
        ffn_hidden=10944,
        first_dense=1,
        n_experts=64,
        top_k=6,
        expert_hidden=1408,
        n_shared_experts=2,
        renormalize=False,
        counted_only=True,
    ),
    # OLMoE-1B-7B (Muennighoff et al. 2024; allenai/OLMoE-1B-7B-0924 config.json): 64 experts
    # (F = 1024), top-8, QK-norm over the whole projections; 6.9B total, 1.3B active.
    "olmoe-1b-7b": dict(
        flavour="llama",
        vocab_size=50304,
        block_size=4096,
        n_layer=16,
        n_head=16,
        n_embd=2048,
        n_experts=64,
        top_k=8,
        expert_hidden=1024,
        renormalize=False,
        qk_norm="full",
        counted_only=True,
    ),
    # Qwen1.5-MoE-A2.7B (Qwen team, "Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated
    # Parameters", 2024; Qwen/Qwen1.5-MoE-A2.7B config.json): 60 experts (F = 1408), top-4, one
    # gated shared expert (F = 5632), biases on q/k/v; 14.3B total, 2.7B active.
    "qwen1.5-moe-a2.7b": dict(flavour="llama", vocab_size=151936, block_size=8192, n_layer=24, n_head=16,
                              n_embd=2048, ffn_hidden=5632, n_experts=60, top_k=4, expert_hidden=1408,
                              n_shared_experts=1, shared_hidden=5632, shared_gate=True, qkv_bias=True,
                              renormalize=False, rope_theta=1e6, counted_only=True),
    # Qwen3-30B-A3B (Qwen team, Qwen3 technical report 2025; Qwen/Qwen3-30B-A3B config.json and
    # model card): 128 experts (F = 768), top-8, GQA 32/4 heads of head_dim 128 (H D = 4096 != C),
    # QK-norm per head; 30.5B total, 3.3B active (we count 3.35B: see docs/families.md).
    "qwen3-30b-a3b": dict(flavour="llama", vocab_size=151936, block_size=40960, n_layer=48, n_head=32, n_kv_head=4,
                          head_dim=128, n_embd=2048, ffn_hidden=6144, n_experts=128, top_k=8, expert_hidden=768,
                          qk_norm="head", rope_theta=1e6, counted_only=True),
    # DeepSeek-V3 671B (DeepSeek-AI, DeepSeek-V3 technical report 2024, sec. 4.2 and table 1;
    # deepseek-ai/DeepSeek-V3 config.json): 61 layers, MLA (q latent 1536, kv latent 512, 128 heads of
    # 128 + 64 RoPE), the first 3 blocks dense (F = 18432), then 256 routed experts (F = 2048) of which
    # 8, within the best 4 of 8 groups, + 1 shared expert; 671B total, 37B active (we count 671.0B
    # and 37.6B with the input embedding and output head; the 14B multi-token-prediction module is
    # not counted, as in the report's 671B).
    "deepseek-v3-671b": dict(flavour="llama", vocab_size=129280, block_size=4096, n_layer=61, n_head=128,
                             n_embd=7168, ffn_hidden=18432, norm_eps=1e-6, attention="mla", q_lora_rank=1536,
                             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             first_dense=3, n_experts=256, top_k=8, expert_hidden=2048, n_shared_experts=1,
                             router="sigmoid_bias", n_group=8, topk_group=4, routed_scaling_factor=2.5,
                             aux_loss_coef=0.0, counted_only=True),
    # Granite-3.0-1B-A400M (IBM, Granite 3.0 language models report 2024;
    # ibm-granite/granite-3.0-1b-a400m-base config.json and model card): 32 experts (F = 512), top-8,
    # GQA 16/8, tied embeddings, muP multipliers; 1.3B total, 400M active (we count 429M: see
    # docs/families.md).
    "granite-3.0-1b-a400m": dict(flavour="llama", vocab_size=49155, block_size=4096, n_layer=24, n_head=16,
                                 n_kv_head=8, n_embd=1024, n_experts=32, top_k=8, expert_hidden=512,
                                 tie_embeddings=True, embedding_multiplier=12.0, attention_multiplier=0.015625,
                                 residual_multiplier=0.22, logits_scaling=6.0, counted_only=True),
    # GPT-4 as RUMOURED: an UNCONFIRMED leak (SemiAnalysis, July 2023; never confirmed by OpenAI):
    # ~1.8T parameters, 120 layers, 16 experts of ~111B each, top-2, ~55B shared attention
    # parameters, ~280B active per token. A width of 10752 (84 heads of 128) with GELU MLP experts
    # of 4x width reproduces those totals; the vocabulary is cl100k's.
    "gpt4-rumoured-full": dict(
        flavour="gpt2",
        vocab_size=100256,
        block_size=8192,
        n_layer=120,
        n_head=84,
        n_embd=10752,
        n_experts=16,
        top_k=2,
        tie_embeddings=False,
        counted_only=True,
    ),
}  # fmt: skip


def toy_presets() -> list[str]:
    """The names of the presets that can be built and trained (not the counted-only ones)."""
    return [name for name, d in PRESETS.items() if not d.get("counted_only")]


def get_preset(name: str, **overrides) -> Config:
    """The Config of a named preset, with optional field overrides (e.g. vocab_size=65)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets are {', '.join(PRESETS)}")
    d = dict(PRESETS[name], name=name)
    d.update(overrides)
    return Config(**d)


def count_params(config: Config) -> dict:
    """Total and active-per-token parameters, and forward FLOPs per token, without building.

    active = total minus the routed experts a token does NOT use (E - K of them per MoE layer);
    embeddings and the output head count as active. Forward FLOPs per token follow PaLM
    (Chowdhery et al. 2022, appendix B): 2 per active matmul weight (the embedding lookups are
    not matmuls; a tied head is) plus 4 * n_layer * T * C for the attention scores and their
    weighted sum at context T = block_size (MLA: 2 * n_layer * T * H * (dn + dr + dv)).
    Training costs about 3x the forward.
    """
    c = config
    C, V, H, Hkv, D = c.n_embd, c.vocab_size, c.n_head, c.n_kv_head, c.head_size
    glu = c.activation == "swiglu"

    def ffn(F):
        return (3 if glu else 2) * C * F + ((F + C) if (c.bias and not glu) else 0)

    norm = C * (2 if c.norm == "layernorm" else 1)
    attn = C * (H + 2 * Hkv) * D + H * D * C  # wqkv, wo
    attn += ((H + 2 * Hkv) * D if c.qkv_bias else 0) + (C if c.bias else 0)  # bqkv, bo
    attn += {"none": 0, "full": (H + Hkv) * D, "head": 2 * D}[c.qk_norm]  # QK-norm gains
    attn_matmul, score_dims = attn, 2 * H * D  # per key: q.k and p.v, over D, for each head
    if c.attention == "mla":
        attn, attn_matmul, score_dims = mla_attention_counts(c)
    embed = V * C + (c.block_size * C if c.pos_emb == "learned" else 0)
    head = 0 if c.tie_embeddings else C * V
    total = active = embed + head + norm  # + final norm
    matmul_active = V * C  # the output head (tied or not)
    for i in range(c.n_layer):
        block = attn + 2 * norm
        total += block
        active += block
        matmul_active += attn_matmul
        if c.is_moe_block(i):
            expert = (3 if glu else 2) * C * c.expert_hidden
            router = C * c.n_experts * (2 if c.router == "noisy" else 1) + (
                c.n_experts if c.router_logit_bias else 0
            )
            shared = ffn(c.n_shared_experts * c.shared_hidden) if c.n_shared_experts else 0
            shared += C if c.shared_gate else 0  # Qwen2-MoE's gate of the shared experts, W_gate (C, 1)
            total += c.n_experts * expert + router + shared
            used = c.top_k * expert + router + shared
            active += used
            matmul_active += used
        else:
            total += ffn(c.ffn_hidden)
            active += ffn(c.ffn_hidden)
            matmul_active += ffn(c.ffn_hidden)
    flops = 2 * matmul_active + 2 * c.n_layer * c.block_size * score_dims
    return {
        "total": int(total),
        "active": int(active),
        "flops_per_token": int(flops),
        "train_flops_per_token": int(3 * flops),
    }


def mla_attention_counts(config: Config) -> tuple[int, int, int]:
    """One Multi-head Latent Attention block (ops/mla.py): (parameters, matmul weights, score dims).

    matmul weights: W_q (C x H(dn+dr)) or W_dq (C x rq) + W_uq (rq x H(dn+dr)); W_dkv (C x (rkv+dr));
    W_ukv (rkv x H(dn+dv)); W_o (H dv x C). Parameters add the latents' RMSNorm gains (rq + rkv).
    score dims: per cached key, the q.k products cover H (dn + dr) and p.v H dv, the way training
    and prefill compute them (k and v expanded from the latent).
    """
    c = config
    C, H, rq, rkv = c.n_embd, c.n_head, c.q_lora_rank, c.kv_lora_rank
    dn, dr, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    query = C * H * (dn + dr) if rq == 0 else C * rq + rq * H * (dn + dr)
    matmul = query + C * (rkv + dr) + rkv * H * (dn + dv) + H * dv * C
    return matmul + rq + rkv, matmul, H * (dn + dr + dv)


def kv_cache_per_token(config: Config) -> int:
    """Numbers the generation cache holds per token, over all layers: 2 * Hkv * D per layer for
    MHA / GQA / MQA (keys and values), kv_lora_rank + qk_rope_head_dim for MLA (latent + RoPE key)."""
    c = config
    if c.attention == "mla":
        return c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim)
    return c.n_layer * 2 * c.n_kv_head * c.head_size
