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
    """A minimoe GPT computing the same function as the HF GPT-2 or Mixtral model
    (`GPT2LMHeadModel`, `MixtralForCausalLM`, or their bare `GPT2Model`/`MixtralModel` when tied).

    state_dict: HF parameter name -> numpy array (torch tensors are accepted too), either name
    set of Mixtral (checkpoint or transformers >= 5 names, see minimoe.hf.names); GPT-2 names
    with or without "transformer.".
    hf_config: config.json as a dict (see `config_from_hf` for the fields and `training`).
    dtype: "float32" or "float64". Returned in eval mode, like HF's from_pretrained.
    Mixtral's router_aux_loss_coef becomes our aux_loss_coef, but the two losses differ
    (see minimoe/ops/balance.py): set model.config.aux_loss_coef yourself when training.
    CheckpointError for a missing, misshapen or unused tensor.
    """
    config = config_from_hf(hf_config, training)
    kind = hf_config["model_type"]
    sd = {k: _as_numpy(v) for k, v in state_dict.items() if not IGNORED.search(k)}
    sd = with_gpt2_prefix(sd) if kind == "gpt2" else unfuse(sd)
    if dtype in (numpy.float32, numpy.float64):
        dtype = numpy.dtype(dtype).name
    model = GPT(config, dtype=dtype)  # refuses a dtype other than "float32" / "float64"
    entries = name_map(config)
    used = set()
    for ours, how, theirs in entries:
        missing = [k for k in theirs if k not in sd]
        if missing:
            raise CheckpointError(
                f"state_dict has no {missing[0]!r} (needed for {ours}); is this a {kind} checkpoint?"
            )
        arr = to_ours([sd[k] for k in theirs], how)
        want = model.params[ours].shape
        if arr.shape != want:
            got = sd[theirs[0]].shape
            raise CheckpointError(
                f"{theirs[0]} has shape {got}, which gives {arr.shape} for {ours}; the config needs {want}"
            )
        model.params[ours] = backend.to_device(numpy.ascontiguousarray(arr), model.xp, model.dtype)
        used.update(theirs)
    if config.tie_embeddings and "lm_head.weight" in sd:  # a tied model's state_dict may repeat the head
        embedding = entries[0].theirs[0]  # wte comes first in every table
        if not numpy.array_equal(sd["lm_head.weight"], sd[embedding]):
            raise CheckpointError(
                "tie_word_embeddings is true, but lm_head.weight differs from the token embedding"
            )
        used.add("lm_head.weight")
    unused = sorted(set(sd) - used)
    if unused:
        raise CheckpointError(
            f"state_dict has {len(unused)} tensor(s) this config does not use, e.g. {unused[:3]}"
        )
    return model.eval()


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
    for ours, how, theirs in name_map(c):
        for name, a in zip(theirs, to_theirs(backend.to_numpy(src[ours]), how, c)):
            out[name] = numpy.ascontiguousarray(a)
    if layout == "fused" and family(c) == "mixtral":
        out = fuse(out, c)
    return out


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
    config = config_from_hf(
        hf_config, training
    )  # refuse a config we cannot represent before reading the weights
    check_fits(
        {"parameters (file and model)": weights_bytes(config, dtype, copies=2)},
        f"the model of {cfg_file}",
        CheckpointError,
        "this machine cannot load it",
    )
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
