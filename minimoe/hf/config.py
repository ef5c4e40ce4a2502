"""Hugging Face config.json <-> minimoe.Config, for GPT-2 and the MoE families of hf/families.py
(Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, Granite-MoE, Granite-MoE-Shared).

    config = config_from_hf(json.load(open("config.json")))   # ConfigError names any field we lack
    hf_config = hf_config_from(model_or_config)               # the reverse, for save_pretrained

Most fields are plain copies, listed in GPT2_FIELDS and hf/families.py's tables (read in one
direction, written back in the other); the code handles only the fields that need a decision.
"""

from __future__ import annotations

import re

from minimoe.config import Config
from minimoe.errors import ConfigError
from minimoe.filecheck import is_int, is_number
from minimoe.hf.families import (
    FAMILIES,
    check_family,
    detect,
    field_names,
    field_table,
    llama_config,
    llama_hf_config,
)
from minimoe.model import GPT

MODEL_TYPES = ("gpt2", *FAMILIES)

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
# Config fields that are not plain copies, with the config.json field an error should name.
GPT2_ALSO = {"ffn_hidden": "n_inner", "dropout": "resid_pdrop"}

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
    # the MoE families (hf/families.py) beyond their tables
    **dict.fromkeys(("q_lora_rank", "n_group", "topk_group", "num_nextn_predict_layers"), "int?"),
    **dict.fromkeys(("use_sliding_window", "rope_interleave"), "bool"),
    **dict.fromkeys(("scoring_func", "topk_method"), "str"),
    "moe_layer_freq": "int",
    "clip_qkv": "num?",
    "mlp_only_layers": "ints?",
}
TYPE_CHECKS = {
    "int": (is_int, "an integer"),
    "int?": (lambda v: v is None or is_int(v), "an integer or null"),
    "num": (is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict?": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "num?": (lambda v: v is None or is_number(v), "a finite number or null"),
    "ints?": (
        lambda v: v is None or (isinstance(v, list) and all(is_int(i) for i in v)),
        "a list of integers or null",
    ),
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
    """The minimoe Config of a config.json (a dict) of one of MODEL_TYPES; ConfigError naming any
    field we cannot represent.

    Dropout and router jitter act only in training. With training=False (inference, the
    default) they are ignored and our dropout is 0; with training=True they must be ones we
    have: one dropout rate (resid_pdrop = embd_pdrop; attn_pdrop 0, as we have no dropout on the
    attention probabilities; the MoE families' attention_dropout 0), and Mixtral's
    router_jitter_noise becomes our router_jitter over the whole MoE input (jitter_scope "moe").
    Fields not named here (token ids, use_cache, architectures, ...) do not change the function.
    """
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (the parsed config.json), got {type(hf_config).__name__}")
    cfg = dict(hf_config)
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"hf_config['model_type'] = {kind!r} is not supported; valid: {MODEL_TYPES}")
    check_field_types(cfg, GPT2_FIELDS if kind == "gpt2" else field_table(kind))
    kw = _gpt2_config(cfg, training) if kind == "gpt2" else llama_config(cfg, kind, training)
    try:
        return Config(name=str(cfg.get("_name_or_path") or kind), **kw)
    except ConfigError as e:  # name the HF field behind the Config field that Config rejected
        ours = re.match(r"Config\.(\w+)", str(e))
        names = {k: v[0] for k, v in GPT2_FIELDS.items()} | GPT2_ALSO if kind == "gpt2" else field_names(kind)
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
def hf_config_from(model_or_config, model_type: str | None = None) -> dict:
    """The config.json (a dict) of a minimoe model or Config, as HF architecture `model_type`
    (one of MODEL_TYPES; None: the one `family` picks). ConfigError naming the first Config field
    that architecture cannot represent.
    """
    c = model_or_config.config if isinstance(model_or_config, GPT) else model_or_config
    kind = family(c, model_type)
    if kind != "gpt2":
        return llama_hf_config(c, kind)
    out = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    out.update({theirs: getattr(c, ours) for ours, (theirs, _) in GPT2_FIELDS.items()})
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
    return out


def family(c: Config, model_type: str | None = None) -> str:
    """The HF model_type whose function Config c computes: `model_type` when given, else picked by
    the feature only one architecture has (LayerNorm: GPT-2; QK-norm over the projection: OLMoE,
    per head: Qwen3-MoE; a gated shared expert: Qwen2-MoE; muP multipliers: Granite-MoE(-Shared);
    otherwise Mixtral). ConfigError naming the first field that architecture cannot represent."""
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type = {model_type!r} is not supported; valid: {MODEL_TYPES}")
    kind = model_type or ("gpt2" if c.norm == "layernorm" else detect(c))
    if kind != "gpt2":
        check_family(c, kind)
        return kind
    need = dict(
        norm="layernorm", pos_emb="learned", bias=True, qkv_bias=True, n_experts=0, n_kv_head=c.n_head
    )
    need.update(qk_norm="none", head_dim=None, embedding_multiplier=1.0, attention_multiplier=None)
    need.update(residual_multiplier=1.0, logits_scaling=1.0)
    if c.activation not in ("gelu", "gelu_exact"):
        need["activation"] = "gelu"
    for field, want in need.items():
        if getattr(c, field) != want:
            raise ConfigError(
                f"Config.{field} = {getattr(c, field)!r} has no GPT-2 equivalent; it needs {want!r}"
            )
    return "gpt2"
