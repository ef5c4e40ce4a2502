"""Hugging Face config.json <-> minimoe.Config, for GPT-2 and Mixtral.

    config = config_from_hf(json.load(open("config.json")))   # ConfigError names any field we lack
    hf_config = hf_config_from(model_or_config)               # the reverse, for save_pretrained

Most fields are plain copies, listed in GPT2_FIELDS / MIXTRAL_FIELDS (read in one direction,
written back in the other); the code below handles only the fields that need a decision.
"""

from __future__ import annotations

import re

from minimoe.config import Config
from minimoe.errors import ConfigError
from minimoe.filecheck import is_int, is_number
from minimoe.model import GPT

MODEL_TYPES = ("gpt2", "mixtral")

# Config field: (config.json field, transformers' default when the field is absent).
# A float or bool default also gives the type the value is read as.
GPT2_FIELDS = {
    "vocab_size": ("vocab_size", None),
    "block_size": ("n_positions", 1024),
    "n_layer": ("n_layer", 12),
    "n_head": ("n_head", 12),
    "n_embd": ("n_embd", 768),
    "norm_eps": ("layer_norm_epsilon", 1e-5),
    "tie_embeddings": ("tie_word_embeddings", True),
    "init_std": ("initializer_range", 0.02),
}
MIXTRAL_FIELDS = {
    "vocab_size": ("vocab_size", None),
    "block_size": ("max_position_embeddings", 131072),
    "n_layer": ("num_hidden_layers", 32),
    "n_head": ("num_attention_heads", 32),
    "n_kv_head": ("num_key_value_heads", None),  # None: as many as query heads
    "n_embd": ("hidden_size", 4096),
    "expert_hidden": ("intermediate_size", 14336),
    "norm_eps": ("rms_norm_eps", 1e-5),
    "rope_theta": ("rope_theta", 1e6),
    "tie_embeddings": ("tie_word_embeddings", False),
    "n_experts": ("num_local_experts", 8),
    "top_k": ("num_experts_per_tok", 2),
    "aux_loss_coef": ("router_aux_loss_coef", 0.001),
    "init_std": ("initializer_range", 0.02),
}
# Config fields that are not plain copies, with the config.json field an error should name.
GPT2_ALSO = {"ffn_hidden": "n_inner", "dropout": "resid_pdrop"}
MIXTRAL_ALSO = {"ffn_hidden": "intermediate_size"}

# GPT-2 activation_function -> our activation. gelu_new and gelu_pytorch_tanh are the same tanh
# approximation; gelu is the exact erf form.
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


# The type of each config.json field read outside the tables above (a table's default gives the
# type of its field: bool, float -> a number, None -> an integer or null, else an integer).
OTHER_FIELD_TYPES = {
    **dict.fromkeys(("n_inner", "head_dim", "sliding_window"), "int?"),
    **dict.fromkeys(("activation_function", "hidden_act"), "str"),
    **dict.fromkeys(("rope_scaling", "rope_parameters"), "dict?"),
    **dict.fromkeys(
        ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "router_jitter_noise"), "num"
    ),
    **dict.fromkeys(("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention"), "bool"),
    **dict.fromkeys(("attention_bias", "mlp_bias"), "bool"),
}
TYPE_CHECKS = {
    "int": (is_int, "an integer"),
    "int?": (lambda v: v is None or is_int(v), "an integer or null"),
    "num": (is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict?": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}


def check_field_types(cfg: dict, table: dict) -> None:
    """ConfigError naming the first field of config.json whose JSON type is wrong (a list where a
    number belongs, ...), so that no later arithmetic on it can fail with a TypeError."""
    want = {
        theirs: "bool"
        if isinstance(d, bool)
        else "num"
        if isinstance(d, float)
        else "int?"
        if d is None
        else "int"
        for theirs, d in table.values()
    }
    want.update(OTHER_FIELD_TYPES)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and not is_number(rope["rope_theta"]):
        _fail("rope_parameters.rope_theta", rope["rope_theta"], "it must be a finite number")
    for field, t in want.items():
        ok, valid = TYPE_CHECKS[t]
        if field in cfg and not ok(cfg[field]):
            _fail(field, cfg[field], f"it must be {valid}")


def _fail(field, value, valid):
    raise ConfigError(f"hf_config[{field!r}] = {value!r} cannot be represented in minimoe: {valid}")


def _copy(cfg: dict, table: dict) -> dict:
    """{Config field: value} of the plain copies in `table` (see GPT2_FIELDS)."""
    out = {}
    for ours, (theirs, default) in table.items():
        value = cfg.get(theirs, default)
        out[ours] = type(default)(value) if isinstance(default, (bool, float)) else value
    return out


# ------------------------------------------------------------------------------ config.json -> ours
def config_from_hf(hf_config: dict, training: bool = False) -> Config:
    """The minimoe Config of a GPT-2 or Mixtral config.json (a dict); ConfigError naming any
    field we cannot represent.

    Dropout and router jitter act only in training. With training=False (inference, the
    default) they are ignored and our dropout is 0; with training=True they must be ones we
    have: one dropout rate (resid_pdrop = embd_pdrop; attn_pdrop 0, as we have no dropout on the
    attention probabilities; Mixtral's attention_dropout 0) and router_jitter_noise 0.
    Fields not named here (token ids, use_cache, architectures, ...) do not change the function.
    """
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (the parsed config.json), got {type(hf_config).__name__}")
    cfg = dict(hf_config)
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"hf_config['model_type'] = {kind!r} is not supported; valid: {MODEL_TYPES}")
    check_field_types(cfg, GPT2_FIELDS if kind == "gpt2" else MIXTRAL_FIELDS)
    kw = _gpt2_config(cfg, training) if kind == "gpt2" else _mixtral_config(cfg, training)
    try:
        return Config(name=str(cfg.get("_name_or_path") or kind), **kw)
    except ConfigError as e:  # name the HF field behind the Config field that Config rejected
        ours = re.match(r"Config\.(\w+)", str(e))
        names = {k: v[0] for k, v in (GPT2_FIELDS if kind == "gpt2" else MIXTRAL_FIELDS).items()}
        names.update(GPT2_ALSO if kind == "gpt2" else MIXTRAL_ALSO)
        theirs = names.get(ours.group(1)) if ours else None
        where = f" (hf_config[{theirs!r}])" if theirs else ""
        raise ConfigError(f"this {kind} config cannot be represented in minimoe{where}: {e}") from None


def _gpt2_config(cfg: dict, training: bool) -> dict:
    act = cfg.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        _fail("activation_function", act, f"valid: {sorted(GPT2_ACTIVATIONS)}")
    if not cfg.get("scale_attn_weights", True):
        _fail("scale_attn_weights", False, "minimoe always scales attention scores by 1/sqrt(D)")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        _fail("scale_attn_by_inverse_layer_idx", True, "minimoe has no per-layer attention scaling")
    if cfg.get("add_cross_attention", False):
        _fail("add_cross_attention", True, "minimoe is decoder-only")
    # reorder_and_upcast_attn only changes the float precision of the same function: accepted.
    kw = _copy(cfg, GPT2_FIELDS)
    kw["flavour"] = "gpt2"
    kw["activation"] = GPT2_ACTIVATIONS[act]
    kw["ffn_hidden"] = cfg.get("n_inner") or 4 * kw["n_embd"]  # n_inner null: 4 C
    kw["dropout"] = _dropout(cfg, training, ("resid_pdrop", "embd_pdrop"), ("attn_pdrop",), 0.1)
    return kw


def _mixtral_config(cfg: dict, training: bool) -> dict:
    kw = _copy(cfg, MIXTRAL_FIELDS)
    C, H = kw["n_embd"], kw["n_head"]
    if cfg.get("hidden_act", "silu") != "silu":
        _fail("hidden_act", cfg["hidden_act"], "Mixtral's experts are SwiGLU, valid: 'silu'")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * H != C:
        _fail("head_dim", head_dim, f"it must equal hidden_size / num_attention_heads = {C}/{H}")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            _fail(field, cfg[field], "minimoe's llama flavour has no biases")
    if cfg.get("rope_scaling"):
        _fail("rope_scaling", cfg["rope_scaling"], "only plain RoPE (rope_scaling null) is supported")
    for key, value in (cfg.get("rope_parameters") or {}).items():  # transformers >= 5 keeps rope_theta here
        if key == "rope_theta":
            kw["rope_theta"] = float(value)
        elif (key, value) not in (("rope_type", "default"), ("partial_rotary_factor", 1.0)):
            _fail(f"rope_parameters.{key}", value, "only plain RoPE (rope_type 'default') is supported")
    if training and cfg.get("router_jitter_noise", 0.0) > 0:
        _fail("router_jitter_noise", cfg["router_jitter_noise"], "minimoe has no input jitter; set it to 0")
    # Sliding-window attention equals full causal attention while T <= sliding_window, so we
    # cap the context there: longer sequences are refused rather than computed differently.
    window = cfg.get("sliding_window")
    if window is not None and window < kw["block_size"]:
        kw["block_size"] = window
    kw.update(
        flavour="llama",
        ffn_hidden=kw["expert_hidden"],  # unused: every Mixtral block is MoE
        dropout=_dropout(cfg, training, (), ("attention_dropout",), 0.0),
        router="softmax",  # softmax over all E, top-k, renormalised over the chosen k
        renormalize=True,
        capacity_factor=0.0,  # dropless
        z_loss_coef=0.0,
    )
    return kw


def _dropout(cfg, training, same, zero, default):
    """Our one dropout rate: the common value of the fields `same`; the fields `zero` must be 0."""
    if not training:
        return 0.0
    rates = {f: float(cfg.get(f, default)) for f in same}
    if len(set(rates.values())) > 1:
        valid = f"minimoe has one dropout rate: it must equal {same[0]} = {rates[same[0]]}"
        _fail(same[1], rates[same[1]], valid)
    for f in zero:
        if float(cfg.get(f, default)) != 0.0:
            _fail(f, cfg.get(f, default), "minimoe has no such dropout; set it to 0 or use training=False")
    return next(iter(rates.values()), 0.0)


# ------------------------------------------------------------------------------ ours -> config.json
def hf_config_from(model_or_config) -> dict:
    """The config.json (a dict) of a GPT-2- or Mixtral-shaped minimoe model or Config.

    ConfigError naming the first Config field that neither architecture has.
    """
    c = model_or_config.config if isinstance(model_or_config, GPT) else model_or_config
    kind = family(c)
    table = GPT2_FIELDS if kind == "gpt2" else MIXTRAL_FIELDS
    out = {
        "model_type": kind,
        "architectures": ["GPT2LMHeadModel" if kind == "gpt2" else "MixtralForCausalLM"],
    }
    out.update({theirs: getattr(c, ours) for ours, (theirs, _) in table.items()})
    if kind == "gpt2":
        out.update(
            n_inner=c.ffn_hidden,
            activation_function={"gelu": "gelu_new", "gelu_exact": "gelu"}[c.activation],
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=0.0,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
        )
    else:
        out.update(
            head_dim=c.head_size,
            hidden_act="silu",
            sliding_window=None,
            attention_dropout=0.0,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    return out


# What a llama-flavour Config must be to be a Mixtral: every block a dropless top-k MoE of SwiGLU
# experts, a renormalised softmax router, no shared experts, no z-loss.
MIXTRAL_NEEDS = {
    "activation": "swiglu",
    "pos_emb": "rope",
    "bias": False,
    "moe_every": 1,
    "first_dense": 0,
    "n_shared_experts": 0,
    "router": "softmax",
    "renormalize": True,
    "capacity_factor": 0.0,
    "z_loss_coef": 0.0,
}


def family(c: Config) -> str:
    """'gpt2' or 'mixtral': the HF architecture whose function this Config computes;
    ConfigError naming the first field that neither has."""
    if c.norm == "layernorm":
        kind, need = "GPT-2", dict(pos_emb="learned", bias=True, n_experts=0, n_kv_head=c.n_head)
        if c.activation == "swiglu":
            need["activation"] = "gelu"
    else:
        kind, need = "Mixtral", MIXTRAL_NEEDS.copy()
        if c.n_experts == 0:
            need["n_experts"] = "> 0 (a dense llama model is not exported)"
    for field, want in need.items():
        if getattr(c, field) != want:
            raise ConfigError(
                f"Config.{field} = {getattr(c, field)!r} has no {kind} equivalent; it needs {want!r}"
            )
    return "gpt2" if kind == "GPT-2" else "mixtral"
