"""Loading and saving: HF state dicts and local model folders <-> minimoe.GPT.

    model = from_hf(state_dict, hf_config)             # HF names -> minimoe.GPT (logits equal HF's)
    sd = to_hf(model)                                  # minimoe.GPT -> HF names (numpy arrays)
    g = to_hf(model, grads=True)                       # the gradients of the last backward(), HF names
    model, tokenizer = load_pretrained("path/to/dir")  # config.json + *.safetensors (+ tokenizer.json)
    save_pretrained(model, "path/to/dir")              # the reverse: transformers can load the folder

Tied embeddings: only the embedding is written (`transformer.wte.weight`, `model.embed_tokens.weight`),
as HF's own checkpoints do; its gradient holds both uses (input embedding and output head), like
the .grad of HF's shared parameter. No `lm_head.weight` is written for a tied model.
"""

from __future__ import annotations

import json
import os

import numpy

from minimoe import backend
from minimoe.errors import CheckpointError
from minimoe.filecheck import expect_object, read_json_file
from minimoe.guards import check_fits, weights_bytes
from minimoe.hf.config import config_from_hf, family, hf_config_from
from minimoe.hf.names import IGNORED, fuse, name_map, to_ours, to_theirs, unfuse, with_gpt2_prefix
from minimoe.layers import moe
from minimoe.layers.params import param_shapes
from minimoe.model import GPT
from minimoe.safetensors import read_checkpoint, write_safetensors

LAYOUTS = ("checkpoint", "fused")


def _as_numpy(v):
    """A numpy array from a numpy array, or a torch tensor (bf16 widened to float32)."""
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return numpy.asarray(v)


def from_hf(state_dict: dict, hf_config: dict, dtype: str = "float32", training: bool = False) -> GPT:
    """A minimoe GPT computing the same function as the HF model of `hf_config` (GPT2LMHeadModel,
    MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM,
    GraniteMoeForCausalLM, GraniteMoeSharedForCausalLM; or their bare *Model when tied).

    state_dict: HF parameter name -> numpy array (torch tensors are accepted too), under either
    name set of the MoE families (the Hub's checkpoint names or transformers >= 5 module names, see
    minimoe.hf.names); GPT-2 names with or without "transformer.". Buffers the checkpoint holds
    that are state of ours (DeepSeek-V3's e_score_correction_bias) go to model.buffers.
    hf_config: config.json as a dict (see `config_from_hf` for the fields and `training`).
    dtype: "float32" or "float64". Returned in eval mode, like HF's from_pretrained.
    Mixtral's router_aux_loss_coef becomes our aux_loss_coef, but the two losses differ
    (see minimoe/ops/balance.py): set model.config.aux_loss_coef yourself when training.
    CheckpointError for a missing, misshapen or unused tensor.
    """
    return _from_state_dict(dict(state_dict), hf_config, dtype, training)


def _from_state_dict(sd: dict, hf_config: dict, dtype, training: bool) -> GPT:
    """from_hf, emptying the dict `sd` as it goes: each tensor is dropped once it is converted, and
    the model is built from the converted arrays without a random initialisation first, so the
    weights are never held twice (load_pretrained of a ~1.3B checkpoint peaks well below twice
    its float32 size; see benchmarks/hf_load_memory.py)."""
    config = config_from_hf(hf_config, training)
    kind = hf_config["model_type"]
    if dtype in (numpy.float32, numpy.float64):
        dtype = numpy.dtype(dtype).name
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    named = with_gpt2_prefix(sd) if kind == "gpt2" else unfuse(sd, kind)
    sd.clear()  # the tensors now live in `named` alone
    for k in [k for k in named if IGNORED.search(k)]:
        del named[k]
    buffer_shapes = {k: v.shape for k, v in moe.init_buffers(config).items()}  # DeepSeek-V3's selection bias
    shapes = {**param_shapes(config), **buffer_shapes}
    entries = name_map(config, kind, shapes, bool(hf_config.get("rope_interleave", True)))
    mtp = range(config.n_layer, config.n_layer + int(hf_config.get("num_nextn_predict_layers") or 0))
    for k in [k for k in named if kind == "deepseek_v3" and _layer_of(k) in mtp]:
        del named[k]  # DeepSeek-V3's multi-token-prediction layers: not part of the model, as in transformers
    if config.tie_embeddings and "lm_head.weight" in named:  # a tied model's state_dict may repeat the head
        head, embedding = named.pop("lm_head.weight"), entries[0].theirs[0]  # wte comes first in every table
        if embedding in named and not numpy.array_equal(_as_numpy(head), _as_numpy(named[embedding])):
            raise CheckpointError(
                "tie_word_embeddings is true, but lm_head.weight differs from the token embedding"
            )
    arrays = {}
    for ours, how, theirs in entries:
        missing = [k for k in theirs if k not in named]
        if missing:
            raise CheckpointError(
                f"state_dict has no {missing[0]!r} (needed for {ours[0]}); is this a {kind} checkpoint?"
            )
        parts = [_as_numpy(named.pop(k)) for k in theirs]
        for name, arr in zip(ours, to_ours(parts, how, config)):
            if arr.shape != shapes[name]:
                raise CheckpointError(
                    f"{theirs[0]} has shape {parts[0].shape}, which gives {arr.shape} for {name}; "
                    f"the config needs {shapes[name]}"
                )
            arrays[name] = numpy.ascontiguousarray(arr, dtype=dtype)  # one converted copy at a time
        del parts
    unused = sorted(named)
    if unused:
        raise CheckpointError(
            f"state_dict has {len(unused)} tensor(s) this config does not use, e.g. {unused[:3]}"
        )
    buffers = {k: arrays.pop(k) for k in buffer_shapes if k in arrays}
    model = GPT(config, dtype=dtype, params=arrays)  # takes the arrays over (no random init)
    for k, v in buffers.items():
        model.buffers[k] = backend.to_device(v, model.xp, model.dtype)
    return model.eval()


def _layer_of(name: str) -> int:
    """k of a "model.layers.k." name, else -1."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit() else -1


def to_hf(
    model: GPT,
    grads: bool = False,
    layout: str = "checkpoint",
    model_type: str | None = None,
    rope_interleave: bool = True,
) -> dict:
    """HF name -> numpy array of the model's parameters (and buffers that checkpoints hold), or
    (grads=True) of the gradients from the last backward(). Arrays keep the model's dtype.

    layout: "checkpoint" (the names in the Hub's safetensors files, loadable by every
    transformers version) or "fused" (transformers >= 5 module names, experts stacked; for GPT-2
    the two are the same). Tied models write only the embedding (see the module docstring).
    model_type: the HF architecture to write (None: the one `hf.config.family` picks);
    ConfigError naming the first Config field it cannot represent.
    rope_interleave: DeepSeek-V3's RoPE columns in DeepSeek's interleaved-pairs layout (True, as its
    checkpoints and the config.json hf_config_from writes) or in our rotate-halves one (False).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src = model.grads if grads else model.params
    if grads and not src:
        raise ValueError(
            "to_hf(grads=True) needs gradients: run model.forward(idx, targets), model.backward()"
        )
    c = model.config
    kind = family(c, model_type)
    if not grads:
        src = {**src, **model.buffers}
    out = {}
    for ours, how, theirs in name_map(c, kind, src, rope_interleave):
        for name, a in zip(theirs, to_theirs([backend.to_numpy(src[o]) for o in ours], how, c)):
            out[name] = numpy.ascontiguousarray(a)
    return fuse(out, c, kind) if layout == "fused" else out


# ---------------------------------------------------------------------------------- local folders
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
    expect_object(read_json_file(file, file), file)  # bounded, and an object, before the parser sees it
    try:
        tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # the tokenizers package raises a plain Exception for a file it cannot parse
        raise CheckpointError(
            f"{file} is not a tokenizer the tokenizers package can read ({_one_line(e)})"
        ) from None
    return HFTokenizer(tok, eos)


def _one_line(e) -> str:
    return " ".join(str(e).split())[:200]


def load_pretrained(path: str, dtype: str = "float32", training: bool = False):
    """(model, tokenizer) from a local HF model folder: config.json + *.safetensors (sharded or
    not) + optionally tokenizer.json. Nothing is downloaded. tokenizer is None without
    tokenizer.json or without the `tokenizers` package."""
    cfg_file = os.path.join(str(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(
            f"{path!r} is not a local model folder with a config.json (nothing is downloaded)"
        )
    hf_config = expect_object(read_json_file(cfg_file, cfg_file), cfg_file)
    config = config_from_hf(hf_config, training)  # refuse a config we cannot represent before reading
    check_fits(
        {"parameters (file and model)": weights_bytes(config, dtype, copies=2)},
        f"the model of {cfg_file}",
        CheckpointError,
        "this machine cannot load it",
    )
    model = _from_state_dict(read_checkpoint(str(path)), hf_config, dtype, training)
    return model, load_tokenizer(str(path), hf_config)


def save_pretrained(model: GPT, path: str, model_type: str | None = None) -> None:
    """Write config.json and model.safetensors (the model's dtype) that transformers can load, as
    HF architecture `model_type` (None: the one `hf.config.family` picks)."""
    os.makedirs(path, exist_ok=True)
    cfg = hf_config_from(model, model_type)
    cfg["torch_dtype"] = model.dtype
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(
        os.path.join(path, "model.safetensors"), to_hf(model, model_type=cfg["model_type"]), {"format": "pt"}
    )
