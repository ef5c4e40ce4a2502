"""Named configurations, and counting parameters and FLOPs without building a model.

Toy presets (they train on a laptop; all at nanoGPT's laptop size: 4 layers, 4 heads, 128 wide,
block 64) are MATCHED IN ACTIVE PARAMETERS PER TOKEN: every feed-forward block spends the same
3 * C * 512 = 196,608 weights on each token (SwiGLU has three C x F matrices), so dense vs MoE
comparisons give both the same compute per token, and the MoE models more capacity.

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
    # OLMoE-1B-7B (Muennighoff et al. 2024): 64 experts (F = 1024), top-8; 6.9B total, 1.3B active.
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
        counted_only=True,
    ),
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
}


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
    attn = C * (H + 2 * Hkv) * D + H * D * C + (((H + 2 * Hkv) * D + C) if c.bias else 0)
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
            router = C * c.n_experts * (2 if c.router == "noisy" else 1)
            shared = ffn(c.n_shared_experts * c.shared_hidden) if c.n_shared_experts else 0
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
