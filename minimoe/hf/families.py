"""config.json <-> Config for the llama-like MoE families: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE,
Granite-MoE, Granite-MoE-Shared and DeepSeek-V3 (with Multi-head Latent Attention).

All of them are RMSNorm + RoPE + SwiGLU decoders whose MoE blocks differ in a few choices, which
these tables name: the plain copies (LLAMA_FIELDS and each family's `fields`, with transformers'
defaults for a field the file leaves out), and what a Config must be to be exported as that
family (LLAMA_NEEDS, each family's `needs` and `rules`). The code below handles the fields that
need a decision; any config.json field we cannot represent is refused by name.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from minimoe.config import Config
from minimoe.errors import ConfigError

ANY = object()  # in `needs`: the family represents every value of this field


class Family(NamedTuple):
    architecture: str  # the transformers class an exported config.json names
    fields: dict  # Config field -> config.json field, plain copies beyond LLAMA_FIELDS
    defaults: dict  # config.json field -> transformers' default (a float or bool default sets the type)
    needs: dict  # Config field -> the value an exported Config must have, beyond LLAMA_NEEDS (ANY: free)
    also: dict  # Config fields set by a decision -> the config.json field an error should name


# Config field -> config.json field, the same in every llama-like family.
LLAMA_FIELDS = {
    "vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
    "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings", "top_k": "num_experts_per_tok",
    "aux_loss_coef": "router_aux_loss_coef", "init_std": "initializer_range",
}  # fmt: skip
# What every exported llama-like Config must be (a family's `needs` override entries): a dropless,
# every-block MoE of SwiGLU experts under a softmax router renormalised over its K, and none of the
# other families' features.
LLAMA_NEEDS = {
    "attention": "mha", "norm": "rmsnorm", "activation": "swiglu", "pos_emb": "rope", "router": "softmax",
    "renormalize": True, "capacity_factor": 0.0, "z_loss_coef": 0.0, "moe_every": 1, "first_dense": 0,
    "n_shared_experts": 0, "shared_gate": False, "bias": False, "qkv_bias": False, "qk_norm": "none",
    "router_logit_bias": False, "n_group": 1, "routed_scaling_factor": 1.0, "embedding_multiplier": 1.0,
    "attention_multiplier": None, "residual_multiplier": 1.0, "logits_scaling": 1.0,
}  # fmt: skip
_COMMON = dict(
    initializer_range=0.02, rope_theta=10000.0, tie_word_embeddings=False, num_key_value_heads=None
)
_QWEN_MOE = dict(moe_every="decoder_sparse_step", renormalize="norm_topk_prob", n_experts="num_experts",
                 expert_hidden="moe_intermediate_size", ffn_hidden="intermediate_size")  # fmt: skip
_GRANITE = dict(n_experts="num_local_experts", expert_hidden="intermediate_size", bias="attention_bias",
                embedding_multiplier="embedding_multiplier", attention_multiplier="attention_multiplier",
                residual_multiplier="residual_multiplier", logits_scaling="logits_scaling")  # fmt: skip
_GRANITE_DEFAULTS = dict(_COMMON, vocab_size=32000, max_position_embeddings=2048, num_hidden_layers=32,
                         num_attention_heads=32, hidden_size=4096, intermediate_size=11008, rms_norm_eps=1e-6,
                         num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
                         attention_bias=False, embedding_multiplier=1.0, attention_multiplier=1.0,
                         residual_multiplier=1.0, logits_scaling=1.0)  # fmt: skip
_MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")

FAMILIES = {
    "mixtral": Family(
        "MixtralForCausalLM",
        dict(n_experts="num_local_experts", expert_hidden="intermediate_size"),
        dict(_COMMON, vocab_size=32000, max_position_embeddings=131072, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, intermediate_size=14336,
             rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2,
             router_aux_loss_coef=0.001),
        {},
        dict(ffn_hidden="intermediate_size", router_jitter="router_jitter_noise"),
    ),
    "olmoe": Family(
        "OlmoeForCausalLM",
        dict(n_experts="num_experts", expert_hidden="intermediate_size", renormalize="norm_topk_prob",
             bias="attention_bias"),
        dict(_COMMON, vocab_size=50304, max_position_embeddings=4096, num_hidden_layers=16,
             num_attention_heads=16, hidden_size=2048, intermediate_size=2048, rms_norm_eps=1e-5,
             num_experts=64, num_experts_per_tok=8, router_aux_loss_coef=0.01, norm_topk_prob=False,
             attention_bias=False),
        dict(qk_norm="full", renormalize=ANY, bias=ANY, qkv_bias=ANY),
        dict(ffn_hidden="intermediate_size", qkv_bias="attention_bias", head_dim="head_dim"),
    ),
    "qwen2_moe": Family(
        "Qwen2MoeForCausalLM",
        dict(_QWEN_MOE, shared_hidden="shared_expert_intermediate_size", qkv_bias="qkv_bias"),
        dict(_COMMON, vocab_size=151936, max_position_embeddings=32768, num_hidden_layers=24,
             num_attention_heads=16, num_key_value_heads=16, hidden_size=2048, intermediate_size=5632,
             rms_norm_eps=1e-6, num_experts=60, num_experts_per_tok=4, router_aux_loss_coef=0.001,
             moe_intermediate_size=1408, shared_expert_intermediate_size=5632, norm_topk_prob=False,
             qkv_bias=True, decoder_sparse_step=1),
        dict(shared_gate=True, n_shared_experts=1, renormalize=ANY, qkv_bias=ANY, moe_every=ANY, first_dense=ANY),
        dict(first_dense="mlp_only_layers", n_shared_experts="shared_expert_intermediate_size"),
    ),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM",
        dict(_QWEN_MOE, bias="attention_bias"),
        dict(_COMMON, vocab_size=151936, max_position_embeddings=32768, num_hidden_layers=24,
             num_attention_heads=32, num_key_value_heads=4, hidden_size=2048, intermediate_size=6144,
             rms_norm_eps=1e-6, num_experts=128, num_experts_per_tok=8, router_aux_loss_coef=0.001,
             moe_intermediate_size=768, norm_topk_prob=False, attention_bias=False, decoder_sparse_step=1),
        dict(qk_norm="head", renormalize=ANY, bias=ANY, qkv_bias=ANY, moe_every=ANY, first_dense=ANY),
        dict(first_dense="mlp_only_layers", qkv_bias="attention_bias", head_dim="head_dim"),
    ),
    "granitemoe": Family(
        "GraniteMoeForCausalLM",
        _GRANITE,
        _GRANITE_DEFAULTS,
        dict(bias=ANY, qkv_bias=ANY, **{m: ANY for m in _MULTIPLIERS}),
        dict(ffn_hidden="intermediate_size", qkv_bias="attention_bias", head_dim="head_dim"),
    ),
    "granitemoeshared": Family(
        "GraniteMoeSharedForCausalLM",
        dict(_GRANITE, shared_hidden="shared_intermediate_size"),
        dict(_GRANITE_DEFAULTS, shared_intermediate_size=0),
        dict(bias=ANY, qkv_bias=ANY, n_shared_experts=ANY, **{m: ANY for m in _MULTIPLIERS}),
        dict(ffn_hidden="intermediate_size", qkv_bias="attention_bias", n_shared_experts="shared_intermediate_size"),
    ),
    "deepseek_v3": Family(
        "DeepseekV3ForCausalLM",
        dict(n_experts="n_routed_experts", expert_hidden="moe_intermediate_size", ffn_hidden="intermediate_size",
             n_shared_experts="n_shared_experts", routed_scaling_factor="routed_scaling_factor",
             n_group="n_group", topk_group="topk_group", first_dense="first_k_dense_replace",
             renormalize="norm_topk_prob", q_lora_rank="q_lora_rank", kv_lora_rank="kv_lora_rank",
             qk_nope_head_dim="qk_nope_head_dim", qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim"),
        dict(_COMMON, vocab_size=129280, max_position_embeddings=4096, num_hidden_layers=61,
             num_attention_heads=128, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
             rms_norm_eps=1e-6, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
             routed_scaling_factor=2.5, n_group=8, topk_group=4, first_k_dense_replace=3, norm_topk_prob=True,
             q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             router_aux_loss_coef=0.0),
        dict(attention="mla", router="sigmoid_bias", renormalize=ANY, first_dense=ANY, n_shared_experts=ANY,
             n_group=ANY, routed_scaling_factor=ANY),
        dict(n_kv_head="num_key_value_heads", shared_hidden="moe_intermediate_size"),
    ),
}  # fmt: skip
# Other names transformers accepts for a field (its configs' attribute_map).
ALIASES = {
    "num_experts": "num_local_experts",
    "num_local_experts": "num_experts",
    "n_routed_experts": "num_local_experts",
}


def fail(field, value, valid):
    raise ConfigError(f"hf_config[{field!r}] = {value!r} cannot be represented in minimoe: {valid}")


def field_table(kind: str) -> dict:
    """Config field -> (config.json field, transformers' default) of every plain copy of `kind`."""
    fam = FAMILIES[kind]
    return {
        ours: (theirs, fam.defaults.get(theirs)) for ours, theirs in {**LLAMA_FIELDS, **fam.fields}.items()
    }


def field_names(kind: str) -> dict:
    """Config field -> the config.json field behind it, for error messages."""
    fam = FAMILIES[kind]
    return {**LLAMA_FIELDS, **fam.fields, **fam.also}


# ------------------------------------------------------------------------------ config.json -> ours
def llama_config(cfg: dict, kind: str, training: bool) -> dict:
    """Config keyword arguments of a llama-like family's config.json (see `config_from_hf`)."""
    fam = FAMILIES[kind]
    kw = {}
    for ours, theirs in {**LLAMA_FIELDS, **fam.fields}.items():
        default = fam.defaults.get(theirs)
        value = cfg.get(theirs, cfg.get(ALIASES.get(theirs), default))
        kw[ours] = type(default)(value) if isinstance(default, (bool, float)) and value is not None else value
    if kw["n_kv_head"] is None:
        kw["n_kv_head"] = kw["n_head"]
    if cfg.get("hidden_act", "silu") != "silu":
        fail("hidden_act", cfg["hidden_act"], "the experts are SwiGLU, valid: 'silu'")
    if cfg.get("mlp_bias"):
        fail("mlp_bias", cfg["mlp_bias"], "minimoe's SwiGLU experts have no biases")
    if cfg.get("attention_bias") and "attention_bias" not in fam.fields.values():
        fail("attention_bias", cfg["attention_bias"], f"{fam.architecture} has no attention biases")
    kw["rope_theta"] = _rope_theta(cfg, fam.defaults["rope_theta"])
    C, H = kw["n_embd"], kw["n_head"]
    head_dim = cfg.get("head_dim") if kind != "deepseek_v3" else None  # DeepSeek's is qk_rope_head_dim
    if head_dim is not None and head_dim * H != C:
        if kind == "olmoe":  # its q_norm has hidden_size gains: H * head_dim must be C
            fail("head_dim", head_dim, f"OLMoE needs hidden_size / num_attention_heads = {C}/{H}")
        kw["head_dim"] = head_dim
    # Sliding-window attention equals full causal attention while T <= the window, so we cap the
    # context there: longer sequences are refused rather than computed differently.
    window = cfg.get("sliding_window")
    if window and (kind == "mixtral" or cfg.get("use_sliding_window")) and window < kw["block_size"]:
        kw["block_size"] = window
    if training and float(cfg.get("attention_dropout", 0.0)) != 0.0:
        fail("attention_dropout", cfg["attention_dropout"], "minimoe has no attention dropout; set it to 0")
    kw.update(flavour="llama", router="softmax", capacity_factor=0.0, z_loss_coef=0.0, dropout=0.0)
    _READ[kind](cfg, kw, training)
    return kw


def _rope_theta(cfg: dict, default: float) -> float:
    """rope_theta (top level, or in transformers >= 5's rope_parameters); only plain RoPE."""
    if cfg.get("rope_scaling"):
        fail("rope_scaling", cfg["rope_scaling"], "only plain RoPE (rope_scaling null) is supported")
    theta = cfg.get("rope_theta", default)
    for key, value in (cfg.get("rope_parameters") or {}).items():
        if key == "rope_theta":
            theta = value
        elif (key, value) not in (("rope_type", "default"), ("partial_rotary_factor", 1.0)):
            fail(f"rope_parameters.{key}", value, "only plain RoPE (rope_type 'default') is supported")
    return float(theta)


def _first_dense(cfg: dict, n_layer: int) -> int:
    """Qwen's mlp_only_layers as our first_dense: it must be the first k layers."""
    dense = sorted(cfg.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        fail("mlp_only_layers", dense, "minimoe makes only the first k layers dense: [0, 1, ..., k-1]")
    return len(dense)


def _read_mixtral(cfg, kw, training):
    jitter = float(cfg.get("router_jitter_noise", 0.0)) if training else 0.0
    # Mixtral jitters the whole MoE input (router and experts), in training only
    kw.update(
        ffn_hidden=kw["expert_hidden"], renormalize=True, bias=False, router_jitter=jitter, jitter_scope="moe"
    )


def _read_olmoe(cfg, kw, training):
    if cfg.get("clip_qkv") is not None:
        fail("clip_qkv", cfg["clip_qkv"], "minimoe does not clamp q, k, v; it must be null")
    kw.update(ffn_hidden=kw["expert_hidden"], qk_norm="full", qkv_bias=kw["bias"])


def _read_qwen2_moe(cfg, kw, training):
    if kw["shared_hidden"] <= 0:
        fail(
            "shared_expert_intermediate_size",
            kw["shared_hidden"],
            "Qwen2-MoE's shared expert needs a size > 0",
        )
    kw.update(bias=False, n_shared_experts=1, shared_gate=True, first_dense=_first_dense(cfg, kw["n_layer"]))


def _read_qwen3_moe(cfg, kw, training):
    kw.update(qk_norm="head", qkv_bias=kw["bias"], first_dense=_first_dense(cfg, kw["n_layer"]))


def _read_granite(cfg, kw, training):
    # Granite's router: top-k of the logits, softmax over those k = our renormalised softmax top-k
    kw.update(ffn_hidden=kw["expert_hidden"], qkv_bias=kw["bias"], renormalize=True)
    shared = kw.pop("shared_hidden", 0)
    if shared:
        kw.update(n_shared_experts=1, shared_hidden=shared)


def _read_deepseek_v3(cfg, kw, training):
    if kw["n_kv_head"] != kw["n_head"]:  # MLA makes every head's keys from the latent
        fail("num_key_value_heads", kw["n_kv_head"], f"MLA needs num_attention_heads = {kw['n_head']}")
    for field, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if cfg.get(field, want) != want:
            fail(field, cfg[field], f"DeepSeek-V3's router is {want!r} here")
    if cfg.get("quantization_config"):  # the Hub's FP8 blocks with their scales
        fail(
            "quantization_config",
            "...",
            "minimoe reads bf16/f16/f32 weights; dequantize the checkpoint first",
        )
    kw.update(attention="mla", router="sigmoid_bias", shared_hidden=kw["expert_hidden"], bias=False)
    kw.update(n_group=kw["n_group"] or 1, topk_group=kw["topk_group"] or 1)


_READ = {
    "mixtral": _read_mixtral,
    "olmoe": _read_olmoe,
    "qwen2_moe": _read_qwen2_moe,
    "qwen3_moe": _read_qwen3_moe,
    "granitemoe": _read_granite,
    "granitemoeshared": _read_granite,
    "deepseek_v3": _read_deepseek_v3,
}


# ------------------------------------------------------------------------------ ours -> config.json
def detect(c: Config) -> str:
    """The llama-like family whose function a Config computes, by the feature only it has
    (check_family then names any field that family cannot represent)."""
    if c.attention == "mla" or c.router == "sigmoid_bias":
        return "deepseek_v3"
    if c.qk_norm == "full":
        return "olmoe"
    if c.qk_norm == "head":
        return "qwen3_moe"
    if c.shared_gate:
        return "qwen2_moe"
    if any(getattr(c, m) != LLAMA_NEEDS[m] for m in _MULTIPLIERS):
        return "granitemoeshared" if c.n_shared_experts else "granitemoe"
    return "mixtral"


def check_family(c: Config, kind: str) -> None:
    """ConfigError naming the first Config field that family `kind` cannot represent."""
    name = FAMILIES[kind].architecture.removesuffix("ForCausalLM")

    def refuse(field, want):
        raise ConfigError(f"Config.{field} = {getattr(c, field)!r} has no {name} equivalent; it needs {want}")

    if c.n_experts == 0:
        refuse("n_experts", "> 0 (a dense llama model is not exported)")
    for field, want in {**LLAMA_NEEDS, **FAMILIES[kind].needs}.items():
        if want is not ANY and getattr(c, field) != want:
            refuse(field, repr(want))
    if kind in ("olmoe", "qwen3_moe", "granitemoe", "granitemoeshared") and c.qkv_bias != c.bias:
        refuse("qkv_bias", f"= bias = {c.bias} (one attention_bias for q, k, v and o)")
    if kind == "olmoe" and c.head_size * c.n_head != c.n_embd:
        refuse("head_dim", f"n_embd / n_head = {c.n_embd // c.n_head} (OLMoE's q_norm spans hidden_size)")
    if kind == "granitemoeshared" and c.n_shared_experts > 1:
        refuse("n_shared_experts", "0 or 1 (one shared MLP)")
    if kind == "deepseek_v3":
        if c.n_shared_experts < 1:
            refuse("n_shared_experts", ">= 1 (DeepSeek-V3's MoE always has shared experts)")
        if c.shared_hidden != c.expert_hidden:
            refuse("shared_hidden", f"expert_hidden = {c.expert_hidden} (its shared experts are routed-size)")


def llama_hf_config(c: Config, kind: str) -> dict:
    """The config.json (a dict) of family `kind` for Config c (check_family(c, kind) first)."""
    fam = FAMILIES[kind]
    out = {"model_type": kind, "architectures": [fam.architecture]}
    out.update({theirs: getattr(c, ours) for ours, theirs in {**LLAMA_FIELDS, **fam.fields}.items()})
    out.update(head_dim=c.head_size, hidden_act="silu", rope_theta=c.rope_theta, attention_dropout=0.0)
    if kind == "deepseek_v3":  # the weights are written in DeepSeek's interleaved RoPE layout (hf/names.py)
        out.update(head_dim=c.qk_rope_head_dim, q_lora_rank=c.q_lora_rank or None, rope_interleave=True)
        out.update(num_nextn_predict_layers=0, scoring_func="sigmoid", topk_method="noaux_tc")
    out.update(output_router_logits=False)
    if kind == "mixtral":
        jitter = c.router_jitter if c.jitter_scope == "moe" else 0.0  # training only, like dropout
        out.update(sliding_window=None, router_jitter_noise=jitter)
    elif kind == "olmoe":
        out.update(clip_qkv=None)
    elif kind in ("qwen2_moe", "qwen3_moe"):
        out.update(mlp_only_layers=list(range(c.first_dense)), use_sliding_window=False)
    elif kind.startswith("granite"):  # an explicit attention_multiplier (transformers' default is 1.0)
        m = c.attention_multiplier
        out.update(attention_multiplier=m if m is not None else 1.0 / math.sqrt(c.head_size))
        if kind == "granitemoeshared":
            out.update(shared_intermediate_size=c.n_shared_experts * c.shared_hidden)
    return out
