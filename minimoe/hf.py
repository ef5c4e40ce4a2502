"""Import and export Hugging Face GPT-2 and Mixtral weights; read local checkpoints without torch.

    model = from_hf(state_dict, hf_config)            # HF names -> minimoe.GPT (logits equal HF's)
    sd = to_hf(model)                                 # minimoe.GPT -> HF names (numpy arrays)
    g = to_hf(model, grads=True)                      # the gradients of the last backward(), HF names
    model, tokenizer = load_pretrained("path/to/dir") # config.json + *.safetensors (+ tokenizer.json)
    save_pretrained(model, "path/to/dir")             # the reverse: transformers can load the folder

Layouts (C channels, V vocab, H heads, Hkv key/value heads, D head size, F hidden, E experts):
  GPT-2's Conv1D stores weights as (in, out), like our linear layers, so they copy as they are;
  c_attn's output is [q | k | v], each H*D wide and head-major: exactly our attn.wqkv.
  Mixtral's nn.Linear stores (out, in): we transpose. q_proj (H*D, C), k_proj and v_proj (Hkv*D, C)
  become the column blocks of our wqkv (C, (H + 2 Hkv) D). HF's checkpoints already use the
  "rotate halves" RoPE layout (their q/k rows are permuted from Meta's interleaved pairs), which is
  ours, so no permutation is needed. Expert e's w1/w3 (F, C) and w2 (C, F) stack into our
  experts.w1/w3 (E, C, F) and experts.w2 (E, F, C); the router gate (E, C) becomes router.w (C, E).
Two Mixtral name sets are read: the checkpoint names stored in the Hub's safetensors files
(`block_sparse_moe.experts.{e}.w1.weight`, ...) and the module names of transformers >= 5
(`mlp.experts.gate_up_proj` (E, 2F, C) = [w1 | w3] rows, `mlp.experts.down_proj` (E, C, F),
`mlp.gate.weight`). `to_hf` writes the checkpoint names, or the fused ones with layout="fused".
Tied embeddings: only the embedding is written (`transformer.wte.weight`, `model.embed_tokens.weight`),
as HF's own checkpoints do; its gradient holds both uses (input embedding and output head),
like the .grad of HF's shared parameter. No `lm_head.weight` is written for a tied model.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct

import numpy

from minimoe import backend
from minimoe.config import Config
from minimoe.model import GPT

MODEL_TYPES = ("gpt2", "mixtral")
LAYOUTS = ("checkpoint", "fused")

# Buffers some checkpoints carry that are not parameters: GPT-2's causal mask, old RoPE tables.
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")

# GPT-2 activation_function -> our activation. gelu_new and gelu_pytorch_tanh are the same tanh
# approximation; gelu is the exact erf form.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


# our block parameter <- GPT-2's (same layout: Conv1D stores (in, out))
_GPT2_BLOCK = (("ln1.w", "ln_1.weight"), ("ln1.b", "ln_1.bias"),
               ("attn.wqkv", "attn.c_attn.weight"), ("attn.bqkv", "attn.c_attn.bias"),
               ("attn.wo", "attn.c_proj.weight"), ("attn.bo", "attn.c_proj.bias"),
               ("ln2.w", "ln_2.weight"), ("ln2.b", "ln_2.bias"),
               ("mlp.w1", "mlp.c_fc.weight"), ("mlp.b1", "mlp.c_fc.bias"),
               ("mlp.w2", "mlp.c_proj.weight"), ("mlp.b2", "mlp.c_proj.bias"))  # fmt: skip


# Config field <- config.json field (the plain copies; the rest is decided in _gpt2/_mixtral_config)
_FIELDS = {
    "gpt2": dict(vocab_size="vocab_size", block_size="n_positions", n_layer="n_layer", n_head="n_head",
                 n_embd="n_embd", ffn_hidden="n_inner", norm_eps="layer_norm_epsilon", dropout="resid_pdrop",
                 init_std="initializer_range"),
    "mixtral": dict(vocab_size="vocab_size", block_size="max_position_embeddings",
                    n_layer="num_hidden_layers", n_head="num_attention_heads",
                    n_kv_head="num_key_value_heads", n_embd="hidden_size",
                    ffn_hidden="intermediate_size", expert_hidden="intermediate_size",
                    norm_eps="rms_norm_eps", rope_theta="rope_theta", n_experts="num_local_experts",
                    top_k="num_experts_per_tok", aux_loss_coef="router_aux_loss_coef",
                    init_std="initializer_range"),
}  # fmt: skip


def _fail(field, value, valid):
    raise ValueError(f"hf_config[{field!r}] = {value!r} cannot be represented in minimoe: {valid}")


# ---------------------------------------------------------------------------------------------
# Config: HF config.json <-> minimoe.Config
# ---------------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict, training: bool = False) -> Config:
    """The minimoe Config of a GPT-2 or Mixtral config.json (a dict); ValueError naming any
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
        raise ValueError(f"hf_config['model_type'] = {kind!r} is not supported; valid: {MODEL_TYPES}")
    common = dict(vocab_size=cfg.get("vocab_size"), init_std=float(cfg.get("initializer_range", 0.02)),
                  name=str(cfg.get("_name_or_path") or kind))  # fmt: skip
    kw = _gpt2_config(cfg, training) if kind == "gpt2" else _mixtral_config(cfg, training)
    try:
        return Config(**common, **kw)
    except ValueError as e:  # name the HF field behind the Config field that Config rejected
        ours = re.match(r"Config\.(\w+)", str(e))
        theirs = _FIELDS[kind].get(ours.group(1)) if ours else None
        where = f" (hf_config[{theirs!r}])" if theirs else ""
        raise ValueError(f"this {kind} config cannot be represented in minimoe{where}: {e}") from None


def _gpt2_config(cfg: dict, training: bool) -> dict:
    act = cfg.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        _fail("activation_function", act, f"valid: {sorted(_GPT2_ACTIVATIONS)}")
    if not cfg.get("scale_attn_weights", True):
        _fail("scale_attn_weights", False, "minimoe always scales attention scores by 1/sqrt(D)")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        _fail("scale_attn_by_inverse_layer_idx", True, "minimoe has no per-layer attention scaling")
    if cfg.get("add_cross_attention", False):
        _fail("add_cross_attention", True, "minimoe is decoder-only")
    # reorder_and_upcast_attn only changes the float precision of the same function: accepted.
    dropout = _dropout(cfg, training, ("resid_pdrop", "embd_pdrop"), ("attn_pdrop",), 0.1)
    n_embd = cfg.get("n_embd", 768)
    return dict(flavour="gpt2", block_size=cfg.get("n_positions", 1024), n_layer=cfg.get("n_layer", 12),
                n_head=cfg.get("n_head", 12), n_embd=n_embd, ffn_hidden=cfg.get("n_inner") or 4 * n_embd,
                activation=_GPT2_ACTIVATIONS[act], norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), dropout=dropout)  # fmt: skip


def _mixtral_config(cfg: dict, training: bool) -> dict:
    C, H = cfg.get("hidden_size", 4096), cfg.get("num_attention_heads", 32)
    Hkv = cfg.get("num_key_value_heads") or H
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
    theta = cfg.get("rope_theta", 1e6)
    rope = cfg.get("rope_parameters") or {}
    for key, value in rope.items():  # transformers >= 5 keeps rope_theta in rope_parameters
        if key == "rope_theta":
            theta = value
        elif (key, value) not in (("rope_type", "default"), ("partial_rotary_factor", 1.0)):
            _fail(f"rope_parameters.{key}", value, "only plain RoPE (rope_type 'default') is supported")
    if training and cfg.get("router_jitter_noise", 0.0) > 0:
        _fail("router_jitter_noise", cfg["router_jitter_noise"], "minimoe has no input jitter; set it to 0")
    dropout = _dropout(cfg, training, (), ("attention_dropout",), 0.0)
    # Sliding-window attention equals full causal attention while T <= sliding_window, so we
    # cap the context there: longer sequences are refused rather than computed differently.
    block_size = cfg.get("max_position_embeddings", 131072)
    window = cfg.get("sliding_window")
    if window is not None and window < block_size:
        block_size = window
    F = cfg.get("intermediate_size", 14336)
    return dict(flavour="llama", block_size=block_size, n_layer=cfg.get("num_hidden_layers", 32), n_head=H,
                n_kv_head=Hkv, n_embd=C, ffn_hidden=F, norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                dropout=dropout, n_experts=cfg.get("num_local_experts", 8),
                top_k=cfg.get("num_experts_per_tok", 2), expert_hidden=F, router="softmax", renormalize=True,
                capacity_factor=0.0, aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
                z_loss_coef=0.0)  # fmt: skip


def _dropout(cfg, training, same, zero, default):
    """Our one dropout rate: the common value of the fields `same`; the fields `zero` must be 0."""
    if not training:
        return 0.0
    rates = {f: float(cfg.get(f, default)) for f in same}
    if len(set(rates.values())) > 1:
        _fail(
            same[1],
            rates[same[1]],
            f"minimoe has one dropout rate: it must equal {same[0]} = {rates[same[0]]}",
        )
    for f in zero:
        if float(cfg.get(f, default)) != 0.0:
            _fail(f, cfg.get(f, default), "minimoe has no such dropout; set it to 0 or use training=False")
    return next(iter(rates.values()), 0.0)


def hf_config_from(model_or_config) -> dict:
    """The config.json (a dict) of a GPT-2- or Mixtral-shaped minimoe model or Config.

    ValueError naming the first Config field that neither architecture has.
    """
    c = model_or_config.config if isinstance(model_or_config, GPT) else model_or_config
    kind = _family(c)
    if kind == "gpt2":
        act = {"gelu": "gelu_new", "gelu_exact": "gelu"}[c.activation]
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                    n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=c.ffn_hidden, activation_function=act, layer_norm_epsilon=c.norm_eps,
                    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=0.0, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    tie_word_embeddings=c.tie_embeddings, initializer_range=c.init_std)  # fmt: skip
    return dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=c.vocab_size,
                hidden_size=c.n_embd, intermediate_size=c.expert_hidden, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_size,
                hidden_act="silu", max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, sliding_window=None, tie_word_embeddings=c.tie_embeddings,
                num_local_experts=c.n_experts, num_experts_per_tok=c.top_k, attention_dropout=0.0,
                router_aux_loss_coef=c.aux_loss_coef, router_jitter_noise=0.0, output_router_logits=False,
                initializer_range=c.init_std)  # fmt: skip


def _family(c: Config) -> str:
    """'gpt2' or 'mixtral': the HF architecture whose function this Config computes."""
    if c.norm == "layernorm":
        kind, need = "GPT-2", dict(pos_emb="learned", bias=True, n_experts=0, n_kv_head=c.n_head)
        if c.activation == "swiglu":
            need["activation"] = "gelu"
    else:
        kind, need = "Mixtral", dict(activation="swiglu", pos_emb="rope", bias=False, moe_every=1,
                                     first_dense=0, n_shared_experts=0, router="softmax", renormalize=True,
                                     capacity_factor=0.0, z_loss_coef=0.0)  # fmt: skip
        if c.n_experts == 0:
            need["n_experts"] = "> 0 (a dense llama model is not exported)"
    for field, want in need.items():
        if getattr(c, field) != want:
            raise ValueError(
                f"Config.{field} = {getattr(c, field)!r} has no {kind} equivalent; it needs {want!r}"
            )
    return "gpt2" if kind == "GPT-2" else "mixtral"


# ---------------------------------------------------------------------------------------------
# Weights: the name map. Each entry: our name, the HF names it is made of, and how.
#   "same": copied;  "T": transposed;  "qkv": q, k, v (out, in) -> [q^T | k^T | v^T];
#   "experts": E tensors (out, in) -> stacked transposes (E, in, out)
# ---------------------------------------------------------------------------------------------


def _name_map(c: Config) -> list:
    E = c.n_experts
    m = []
    if _family(c) == "gpt2":
        t = "transformer."
        m += [("wte", [t + "wte.weight"], "same"), ("wpe", [t + "wpe.weight"], "same")]
        for i in range(c.n_layer):
            b, h = f"blocks.{i}.", f"{t}h.{i}."
            for ours, theirs in _GPT2_BLOCK:
                m.append((b + ours, [h + theirs], "same"))
        m += [("ln_f.w", [t + "ln_f.weight"], "same"), ("ln_f.b", [t + "ln_f.bias"], "same")]
    else:
        m.append(("wte", ["model.embed_tokens.weight"], "same"))
        for i in range(c.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            a, x = h + "self_attn.", h + "block_sparse_moe."
            m += [
                (b + "ln1.w", [h + "input_layernorm.weight"], "same"),
                (b + "attn.wqkv", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], "qkv"),
                (b + "attn.wo", [a + "o_proj.weight"], "T"),
                (b + "ln2.w", [h + "post_attention_layernorm.weight"], "same"),
                (b + "moe.router.w", [x + "gate.weight"], "T"),
            ]
            for w in ("w1", "w3", "w2"):
                experts = [f"{x}experts.{e}.{w}.weight" for e in range(E)]
                m.append((b + "moe.experts." + w, experts, "experts"))
        m.append(("ln_f.w", ["model.norm.weight"], "same"))
    if not c.tie_embeddings:
        m.append(("lm_head", ["lm_head.weight"], "T"))
    return m


def _to_ours(arrays, how):
    if how == "same":
        return arrays[0]
    if how == "T":
        return arrays[0].T
    if how == "qkv":
        return numpy.concatenate([a.T for a in arrays], axis=1)
    return numpy.stack([a.T for a in arrays])  # experts


def _to_theirs(a, how, c):
    if how == "same":
        return [a]
    if how == "T":
        return [a.T]
    if how == "qkv":
        H, Hkv, D = c.n_head, c.n_kv_head, c.head_size
        return [a[:, : H * D].T, a[:, H * D : (H + Hkv) * D].T, a[:, (H + Hkv) * D :].T]
    return [a[e].T for e in range(a.shape[0])]  # experts


def _as_numpy(v):
    """A numpy array from a numpy array, or a torch tensor (bf16 widened to float32)."""
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return numpy.asarray(v)


def _unfuse(sd: dict) -> dict:
    """transformers >= 5 Mixtral module names -> checkpoint names (other keys unchanged)."""
    out = {}
    for k, v in sd.items():
        hit = re.match(r"(.*\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$", k)
        if not hit:
            out[k] = v
            continue
        pre, what = hit.group(1) + "block_sparse_moe.", hit.group(2)
        if what == "gate.weight":
            out[pre + "gate.weight"] = v
        elif what == "experts.down_proj":  # (E, C, F): expert e's w2
            for e in range(v.shape[0]):
                out[f"{pre}experts.{e}.w2.weight"] = v[e]
        else:  # gate_up_proj (E, 2F, C): rows [w1 | w3]
            F = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}experts.{e}.w1.weight"], out[f"{pre}experts.{e}.w3.weight"] = v[e, :F], v[e, F:]
    return out


def _fuse(sd: dict, c: Config) -> dict:
    """Checkpoint names -> transformers >= 5 Mixtral module names."""
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    for i in range(c.n_layer):
        x, y = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        E = range(c.n_experts)
        out[y + "gate.weight"] = sd[x + "gate.weight"]
        out[y + "experts.gate_up_proj"] = numpy.stack(
            [numpy.concatenate([sd[f"{x}experts.{e}.w1.weight"], sd[f"{x}experts.{e}.w3.weight"]]) for e in E]
        )
        out[y + "experts.down_proj"] = numpy.stack([sd[f"{x}experts.{e}.w2.weight"] for e in E])
    return out


def from_hf(state_dict: dict, hf_config: dict, dtype: str = "float32", training: bool = False) -> GPT:
    """A minimoe GPT computing the same function as the HF GPT-2 or Mixtral model
    (`GPT2LMHeadModel`, `MixtralForCausalLM`, or their bare `GPT2Model`/`MixtralModel` when tied).

    state_dict: HF parameter name -> numpy array (torch tensors are accepted too), either name
    set of Mixtral (see the module docstring); GPT-2 names with or without "transformer.".
    hf_config: config.json as a dict (see `config_from_hf` for the fields and `training`).
    dtype: "float32" or "float64". Returned in eval mode, like HF's from_pretrained.
    Mixtral's router_aux_loss_coef becomes our aux_loss_coef, but the two losses differ
    (see minimoe/ops/balance.py): set model.config.aux_loss_coef yourself when training.
    """
    config = config_from_hf(hf_config, training)
    kind = hf_config["model_type"]
    sd = {k: _as_numpy(v) for k, v in state_dict.items() if not _IGNORED.search(k)}
    if config.flavour == "gpt2":
        sd = {(k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k): v
              for k, v in sd.items()}  # fmt: skip
    else:
        sd = _unfuse(sd)
    if dtype in (numpy.float32, numpy.float64):
        dtype = numpy.dtype(dtype).name
    model = GPT(config, dtype=dtype)  # refuses a dtype other than "float32" / "float64"
    used = set()
    for ours, theirs, how in _name_map(config):
        missing = [k for k in theirs if k not in sd]
        if missing:
            raise ValueError(
                f"state_dict has no {missing[0]!r} (needed for {ours}); is this a {kind} checkpoint?"
            )
        arr = _to_ours([sd[k] for k in theirs], how)
        want = model.params[ours].shape
        if arr.shape != want:
            got = sd[theirs[0]].shape
            raise ValueError(
                f"{theirs[0]} has shape {got}, which gives {arr.shape} for {ours}; the config needs {want}"
            )
        model.params[ours] = _device(arr, model)
        used.update(theirs)
    if config.tie_embeddings and "lm_head.weight" in sd:  # a tied model's state_dict may repeat the head
        if not numpy.array_equal(sd["lm_head.weight"], sd[_name_map(config)[0][1][0]]):
            raise ValueError(
                "tie_word_embeddings is true, but lm_head.weight differs from the token embedding"
            )
        used.add("lm_head.weight")
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(
            f"state_dict has {len(unused)} tensor(s) this config does not use, e.g. {unused[:3]}"
        )
    return model.eval()


def _device(arr, model):
    return backend.to_device(numpy.ascontiguousarray(arr), model.xp, model.dtype)


def to_hf(model: GPT, grads: bool = False, layout: str = "checkpoint") -> dict:
    """HF name -> numpy array of the model's parameters, or (grads=True) of the gradients
    from the last backward(). Arrays keep the model's dtype.

    layout: "checkpoint" (the names in the Hub's safetensors files, loadable by every
    transformers version) or "fused" (transformers >= 5 Mixtral module names; for GPT-2 the two
    are the same). Tied models write only the embedding (see the module docstring).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src = model.grads if grads else model.params
    if grads and not src:
        raise ValueError(
            "to_hf(grads=True) needs gradients: run model.forward(idx, targets), model.backward()"
        )
    c = model.config
    out = {}
    for ours, theirs, how in _name_map(c):
        for name, a in zip(theirs, _to_theirs(backend.to_numpy(src[ours]), how, c)):
            out[name] = numpy.ascontiguousarray(a)
    if layout == "fused" and _family(c) == "mixtral":
        out = _fuse(out, c)
    return out


# ---------------------------------------------------------------------------------------------
# safetensors, read and written with numpy alone. A file is:
#   8 bytes  little-endian uint64 n;  n bytes  JSON header
#            {name: {"dtype": "F32", "shape": [...], "data_offsets": [start, end]}, "__metadata__": {...}}
#   then the raw little-endian bytes of every tensor; offsets count from the end of the header.
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}  # fmt: skip


def read_safetensors(path: str) -> dict:
    """name -> numpy array of one .safetensors file. bfloat16 becomes float32 (exactly: a bf16
    number is the top 16 bits of the float32 with the same value)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    empty = size == 8 + n  # numpy cannot memory-map zero bytes
    data = numpy.zeros(0, numpy.uint8) if empty else numpy.memmap(path, numpy.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dt!r}; supported: {sorted(_ST_DTYPES)}")
        shape, (start, end) = tuple(info["shape"]), info["data_offsets"]
        np_dt = numpy.dtype(_ST_DTYPES[dt])
        nbytes = int(numpy.prod(shape)) * np_dt.itemsize
        if end - start != nbytes or end > data.size:
            raise ValueError(f"{path}: tensor {name!r} has bytes [{start}, {end}) of {data.size}, "
                             f"but shape {list(shape)} of {dt} needs {nbytes}")  # fmt: skip
        a = data[start:end].view(np_dt).reshape(shape)  # a view of the file, maybe unaligned
        if dt == "BF16":
            a = (a.astype(numpy.uint32) << 16).view(numpy.float32)
        out[name] = a.astype(a.dtype.newbyteorder("="))  # an aligned, native-order copy in memory
    return out


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write name -> numpy array (float64/32/16, integer or bool) as one .safetensors file."""
    names = {numpy.dtype(v).name: k for k, v in _ST_DTYPES.items() if k != "BF16"}
    header, blobs, pos = {}, [], 0
    for name, a in tensors.items():
        a = numpy.asarray(a)
        if a.dtype.name not in names:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype}; writable: {sorted(names)}")
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = dict(
            dtype=names[a.dtype.name], shape=list(a.shape), data_offsets=[pos, pos + len(raw)]
        )
        blobs.append(raw)
        pos += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


def read_checkpoint(path: str) -> dict:
    """Every tensor of a folder's safetensors: sharded via model.safetensors.index.json, or
    model.safetensors, or all *.safetensors files."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        sd = {}
        for shard in sorted(set(weight_map.values())):
            tensors = read_safetensors(os.path.join(path, shard))
            missing = sorted(k for k, f in weight_map.items() if f == shard and k not in tensors)
            if missing:
                raise ValueError(f"{index} puts {missing[0]!r} in {shard}, which does not hold it")
            sd.update(tensors)
        return sd
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(
            f"{path} holds no *.safetensors file (a pytorch_model.bin is not read: it needs torch)"
        )
    sd = {}
    for file in files:
        sd.update(read_safetensors(file))
    return sd


# ---------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from tokenizer.json, with minimoe's encode/decode contract.

    encode adds the special tokens the tokenizer's post-processor asks for (Mixtral's BOS;
    GPT-2 has none), as transformers' tokenizers do by default.
    """

    def __init__(self, tok, eos_token_id=None):
        self.tok = tok
        self.eos_token_id = eos_token_id
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list:
        return list(self.tok.encode(text).ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(path: str, hf_config: dict | None = None):
    """An HFTokenizer for the folder's tokenizer.json, or None when there is none or the optional
    `tokenizers` package is not installed."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        return None
    try:
        import tokenizers
    except ImportError:
        return None
    eos = (hf_config or {}).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return HFTokenizer(tokenizers.Tokenizer.from_file(file), eos)


def load_pretrained(path: str, dtype: str = "float32", training: bool = False):
    """(model, tokenizer) from a local HF model folder: config.json + *.safetensors (sharded or
    not) + optionally tokenizer.json. Nothing is downloaded. tokenizer is None without
    tokenizer.json or without the `tokenizers` package."""
    cfg_file = os.path.join(str(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{path!r} is not a local model folder with a config.json (nothing is downloaded)")
    with open(cfg_file, encoding="utf-8") as f:
        hf_config = json.load(f)
    model = from_hf(read_checkpoint(str(path)), hf_config, dtype=dtype, training=training)
    return model, load_tokenizer(str(path), hf_config)


def save_pretrained(model: GPT, path: str) -> None:
    """Write config.json and model.safetensors (the model's dtype) that transformers can load."""
    os.makedirs(path, exist_ok=True)
    cfg = hf_config_from(model)
    cfg["torch_dtype"] = model.dtype
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(path, "model.safetensors"), to_hf(model), {"format": "pt"})
