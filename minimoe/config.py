"""One `Config` dataclass describes every model minimoe builds or counts.

Two flavours set the architecture's defaults:
  gpt2  : LayerNorm, GELU (tanh) MLP, learned positions, tied input/output embeddings, biases.
  llama : RMSNorm, RoPE, SwiGLU MLP, no biases, untied output head (also Mixtral, DeepSeek).
Any of those choices can still be set field by field (e.g. to mirror a checkpoint's config).
Setting `n_experts > 0` replaces the MLP of some blocks by a Mixture-of-Experts layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from minimoe.errors import ConfigError

FLAVOURS = {
    "gpt2": dict(norm="layernorm", activation="gelu", pos_emb="learned", tie_embeddings=True, bias=True),
    "llama": dict(norm="rmsnorm", activation="swiglu", pos_emb="rope", tie_embeddings=False, bias=False),
}
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_exact", "swiglu", "relu")
POS_EMBS = ("learned", "rope", "none")
ROUTERS = ("softmax", "noisy", "sigmoid_bias")
QK_NORMS = ("none", "full", "head")
JITTER_SCOPES = ("router", "moe")
ATTENTIONS = ("mha", "mla")  # mha covers GQA and MQA (n_kv_head); mla: ops/mla.py


@dataclass
class Config:
    # --- the dense transformer ---
    flavour: str = "gpt2"
    vocab_size: int = 256
    block_size: int = 64  # longest context (T) the model accepts
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # key/value heads (GQA); None = n_head (MHA); 1 = MQA
    n_embd: int = 128  # C
    ffn_hidden: Optional[int] = None  # F of dense MLPs; None = 4 * n_embd
    norm: Optional[str] = None  # None = the flavour's choice (see FLAVOURS)
    activation: Optional[str] = None
    pos_emb: Optional[str] = None
    tie_embeddings: Optional[bool] = None
    bias: Optional[bool] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # --- attention and scaling variants of the real families (docs/families.md) ---
    head_dim: Optional[int] = None  # D; None = n_embd // n_head (Qwen3 uses 128 whatever C is)
    qkv_bias: Optional[bool] = None  # biases on the q, k, v projections; None = bias (Qwen2: q/k/v only)
    qk_norm: str = "none"  # RMSNorm of q and k: "full" projection (OLMoE) | per "head" (Qwen3-MoE)
    embedding_multiplier: float = 1.0  # x0 = embedding_multiplier * wte[idx]          (Granite, muP)
    attention_multiplier: Optional[float] = None  # scores = q k^T * this; None = 1/sqrt(D)
    residual_multiplier: float = 1.0  # x = x + residual_multiplier * f(Norm(x))
    logits_scaling: float = 1.0  # logits = Norm(x) W_head / logits_scaling
    dropout: float = 0.0
    init_std: float = 0.02
    # --- attention kind; the MLA sizes (DeepSeek-V2/V3) are None unless attention = "mla" ---
    attention: str = "mha"  # see ATTENTIONS
    q_lora_rank: Optional[int] = 0  # MLA query latent size; 0 (or None) = a direct query projection
    kv_lora_rank: Optional[int] = None  # MLA key/value latent size; None = 4 * head_size
    qk_nope_head_dim: Optional[int] = None  # per-head query/key part without RoPE; None = head_size
    qk_rope_head_dim: Optional[int] = None  # the shared RoPE key's size; None = head_size // 2
    v_head_dim: Optional[int] = None  # None = head_size
    latent_norm_eps: float = 1e-6  # epsilon of the RMSNorms on MLA's latents (1e-6 in DeepSeek-V3)
    # --- Mixture of Experts (n_experts = 0: a dense model) ---
    n_experts: int = 0  # E routed experts per MoE layer
    top_k: int = 2  # K experts per token
    moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0 ...
    first_dense: int = 0  # ... and i >= first_dense (DeepSeekMoE keeps its first block dense)
    expert_hidden: Optional[int] = None  # F of each routed expert; None = ffn_hidden
    n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), each of width shared_hidden
    shared_hidden: Optional[int] = None  # None = expert_hidden
    router: str = "softmax"  # see ROUTERS
    renormalize: bool = True  # softmax top-k: renormalise over the chosen K (Mixtral) or not (Switch)
    capacity_factor: float = 0.0  # 0 = dropless; else each expert takes ceil(cf * N * K / E) slots
    capacity_groups: int = 1  # GShard groups: N tokens in G equal contiguous groups, capacity per group
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    z_loss_coef: float = 0.0  # ST-MoE router z-loss weight
    bias_update_rate: float = 1e-3  # DeepSeek-V3 selection-bias step (router="sigmoid_bias")
    router_init_std: Optional[float] = None  # None = init_std
    # --- router and expert variants of the real families (docs/families.md) ---
    shared_gate: bool = False  # Qwen2-MoE: shared experts' output * sigmoid(x W_gate), a scalar per token
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts in n_group groups ...
    topk_group: int = 1  # ... and each token picks its experts from its topk_group best groups
    routed_scaling_factor: float = 1.0  # the routed experts' gates are multiplied by this (DeepSeek-V3)
    router_logit_bias: bool = False  # a trained bias on the router logits, x W + b (Switch)
    router_jitter: float = 0.0  # training only: input * U(1 - j, 1 + j) before routing (Switch, Mixtral)
    jitter_scope: str = (
        "router"  # jitter the router's input ("router", Switch) or all the MoE's ("moe", Mixtral)
    )
    # --- bookkeeping ---
    name: str = ""
    counted_only: bool = False  # a published full-size config: count it, never build it

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"Config.flavour must be one of {tuple(FLAVOURS)}, got {self.flavour!r}")
        for key, value in FLAVOURS[self.flavour].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd
        if self.expert_hidden is None:
            self.expert_hidden = self.ffn_hidden
        if self.shared_hidden is None:
            self.shared_hidden = self.expert_hidden
        if self.router_init_std is None:
            self.router_init_std = self.init_std
        self._mla_defaults()
        self.validate()

    def _mla_defaults(self):
        """MLA sizes left None take DeepSeek-V2's proportions to the head size D: latent 4 D,
        no-position part D, RoPE part D / 2, values D (V2: D = 128, 512, 128, 64, 128)."""
        if self.q_lora_rank is None:  # transformers' spelling of "no query latent"
            self.q_lora_rank = 0
        if self.attention != "mla" or not all(
            isinstance(n, int) and n >= 1 for n in (self.n_head, self.n_embd)
        ):
            return  # validate() names the bad field
        D = self.head_size
        sizes = dict(kv_lora_rank=4 * D, qk_nope_head_dim=D, qk_rope_head_dim=D // 2, v_head_dim=D)
        for f, v in sizes.items():
            if getattr(self, f) is None:
                setattr(self, f, v)

    def validate(self):
        """Raise ConfigError (a ValueError) naming the first invalid field and what would be valid."""

        def need(cond, field, valid):
            if not cond:
                raise ConfigError(f"Config.{field} = {getattr(self, field)!r} is invalid: {valid}")

        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "it must be an integer >= 1")
        if self.head_dim is None:
            need(self.n_embd % self.n_head == 0, "n_embd", f"it must be divisible by n_head = {self.n_head}")
        need(self.n_head % self.n_kv_head == 0, "n_kv_head", f"it must divide n_head = {self.n_head}")
        need(self.norm in NORMS, "norm", f"it must be one of {NORMS}")
        need(self.activation in ACTIVATIONS, "activation", f"it must be one of {ACTIVATIONS}")
        need(self.pos_emb in POS_EMBS, "pos_emb", f"it must be one of {POS_EMBS}")
        if self.pos_emb == "rope" and self.attention != "mla":  # MLA checks its own RoPE part
            field = "n_embd" if self.head_dim is None else "head_dim"
            need(self.head_size % 2 == 0, field, "RoPE needs an even head size (head_dim or n_embd/n_head)")
        need(self.rope_theta > 0, "rope_theta", "it must be > 0")
        need(self.norm_eps > 0, "norm_eps", "it must be > 0")
        need(0.0 <= self.dropout < 1.0, "dropout", "it must be in [0, 1)")
        need(self.init_std > 0, "init_std", "it must be > 0")
        need(
            isinstance(self.n_experts, int) and self.n_experts >= 0, "n_experts", "it must be an integer >= 0"
        )
        if self.n_experts > 0:
            need(
                isinstance(self.top_k, int) and 1 <= self.top_k <= self.n_experts,
                "top_k",
                f"it must be between 1 and n_experts = {self.n_experts}",
            )
            need(self.moe_every >= 1, "moe_every", "it must be >= 1")
            need(0 <= self.first_dense <= self.n_layer, "first_dense", f"it must be in [0, {self.n_layer}]")
            need(self.expert_hidden >= 1, "expert_hidden", "it must be >= 1")
            need(self.shared_hidden >= 1, "shared_hidden", "it must be >= 1")
            need(self.n_shared_experts >= 0, "n_shared_experts", "it must be >= 0")
            need(self.router in ROUTERS, "router", f"it must be one of {ROUTERS}")
            need(self.capacity_factor >= 0, "capacity_factor", "it must be >= 0 (0 = dropless)")
            need(
                isinstance(self.capacity_groups, int) and self.capacity_groups >= 1,
                "capacity_groups",
                "it must be an integer >= 1",
            )
            need(self.aux_loss_coef >= 0, "aux_loss_coef", "it must be >= 0")
            need(self.z_loss_coef >= 0, "z_loss_coef", "it must be >= 0")
            self._validate_router_variants(need)
        self._validate_attention_variants(need)
        self._validate_mla(need)

    def _validate_attention_variants(self, need):
        """The head size, QK-norm and muP multipliers (issue 14's attention and scaling variants)."""
        if self.head_dim is not None:
            need(
                isinstance(self.head_dim, int) and self.head_dim >= 1,
                "head_dim",
                "it must be an integer >= 1",
            )
        need(self.qk_norm in QK_NORMS, "qk_norm", f"it must be one of {QK_NORMS}")
        for f in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            need(getattr(self, f) > 0, f, "it must be > 0")
        if self.attention_multiplier is not None:
            need(self.attention_multiplier > 0, "attention_multiplier", "it must be > 0 (or None: 1/sqrt(D))")

    def _validate_router_variants(self, need):
        """Router groups, scaling, bias and jitter; gated shared experts (issue 14's MoE variants)."""
        E = self.n_experts
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "it must be > 0")
        need(0.0 <= self.router_jitter < 1.0, "router_jitter", "it must be in [0, 1)")
        need(self.jitter_scope in JITTER_SCOPES, "jitter_scope", f"it must be one of {JITTER_SCOPES}")
        need(
            not self.shared_gate or self.n_shared_experts > 0,
            "shared_gate",
            "a gate needs shared experts (n_shared_experts > 0)",
        )
        need(isinstance(self.n_group, int) and self.n_group >= 1, "n_group", "it must be an integer >= 1")
        if self.n_group > 1:
            need(
                self.router == "sigmoid_bias",
                "n_group",
                "group-limited routing is DeepSeek-V3's and needs router='sigmoid_bias'",
            )
            need(
                E % self.n_group == 0 and E // self.n_group >= 2,
                "n_group",
                f"it must divide n_experts = {E} into groups of at least 2 (a group scores by its top 2)",
            )
        need(
            isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group,
            "topk_group",
            f"it must be between 1 and n_group = {self.n_group}",
        )
        if self.n_group > 1:
            need(
                self.top_k <= self.topk_group * (E // self.n_group),
                "topk_group",
                f"its {self.topk_group} group(s) of {E // self.n_group} experts must hold top_k = {self.top_k}",
            )

    def _validate_mla(self, need):
        """The attention kind and, for MLA, its sizes and the combinations it cannot take."""
        need(self.attention in ATTENTIONS, "attention", f"it must be one of {ATTENTIONS}")
        mla_sizes = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.attention != "mla":
            need(self.q_lora_rank == 0, "q_lora_rank", "it applies only with attention='mla' (set it to 0)")
            for f in mla_sizes:
                need(getattr(self, f) is None, f, "it applies only with attention='mla' (set it to None)")
            return
        need(
            isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 0,
            "q_lora_rank",
            "it must be an integer >= 0 (0 = a direct query projection)",
        )
        for f in mla_sizes:
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "it must be an integer >= 1")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "RoPE rotates pairs: it must be even")
        need(self.latent_norm_eps > 0, "latent_norm_eps", "it must be > 0")
        need(self.pos_emb == "rope", "pos_emb", "attention='mla' needs 'rope' (its decoupled RoPE key)")
        need(not self.bias, "bias", "attention='mla' has no attention biases here: set bias=False")
        need(
            self.n_kv_head == self.n_head,
            "n_kv_head",
            f"attention='mla' has no key/value heads to group: it must equal n_head = {self.n_head}",
        )
        need(not self.qkv_bias, "qkv_bias", "attention='mla' has no attention biases here: set it False")
        need(self.qk_norm == "none", "qk_norm", "attention='mla' normalises its latents instead: set 'none'")
        need(
            self.attention_multiplier is None,
            "attention_multiplier",
            "attention='mla' scales its scores by 1/sqrt(qk_nope_head_dim + qk_rope_head_dim): set None",
        )

    # ----- derived -----
    @property
    def head_size(self) -> int:
        """D, the size of one attention head: head_dim, or n_embd / n_head when that is None."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def rope_dim(self) -> int:
        """The size RoPE rotates: the head size, or MLA's shared RoPE part qk_rope_head_dim."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_size

    def is_moe_block(self, i: int) -> bool:
        """Whether block i (0-based) has a MoE layer in place of its dense MLP."""
        return self.n_experts > 0 and i >= self.first_dense and (i + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown Config field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> Config:
        """A copy with some fields changed (flavour-derived fields are kept unless changed)."""
        d = self.to_dict()
        d.update(changes)
        return Config.from_dict(d)
