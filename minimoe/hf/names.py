"""Which Hugging Face tensors make each minimoe parameter, and how: the name maps as tables.

Each row reads: our parameter name, how our array is made from theirs, their tensor name(s).
    same     copied as is
    T        transposed (nn.Linear stores (out, in); our linear layers take (in, out))
    qkv      q, k, v projections (out, in) -> the column blocks [q^T | k^T | v^T], (C, (H + 2 Hkv) D)
    experts  one (out, in) tensor per expert e -> their transposes stacked, (E, in, out)
Block rows are relative to the block's prefix ({i}: the block number); "{e}" is the expert number.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy

from minimoe.config import Config
from minimoe.hf.config import family

# GPT-2: Conv1D stores weights (in, out), like our linear layers, so every tensor is copied; c_attn's
# output is [q | k | v], each H*D wide and head-major: exactly our attn.wqkv.
GPT2_LAYER = "transformer.h.{i}."
GPT2_TOP = (
    ("wte", "same", ("transformer.wte.weight",)),
    ("wpe", "same", ("transformer.wpe.weight",)),
    ("ln_f.w", "same", ("transformer.ln_f.weight",)),
    ("ln_f.b", "same", ("transformer.ln_f.bias",)),
)
GPT2_BLOCK = (
    ("ln1.w", "same", ("ln_1.weight",)),
    ("ln1.b", "same", ("ln_1.bias",)),
    ("attn.wqkv", "same", ("attn.c_attn.weight",)),
    ("attn.bqkv", "same", ("attn.c_attn.bias",)),
    ("attn.wo", "same", ("attn.c_proj.weight",)),
    ("attn.bo", "same", ("attn.c_proj.bias",)),
    ("ln2.w", "same", ("ln_2.weight",)),
    ("ln2.b", "same", ("ln_2.bias",)),
    ("mlp.w1", "same", ("mlp.c_fc.weight",)),
    ("mlp.b1", "same", ("mlp.c_fc.bias",)),
    ("mlp.w2", "same", ("mlp.c_proj.weight",)),
    ("mlp.b2", "same", ("mlp.c_proj.bias",)),
)

# Mixtral, under the names of the Hub's checkpoint files. HF's checkpoints already use the "rotate
# halves" RoPE layout (their q/k rows are permuted from Meta's interleaved pairs), which is ours,
# so no permutation is needed. The router gate (E, C) becomes router.w (C, E); expert e's w1/w3
# (F, C) and w2 (C, F) stack into experts.w1/w3 (E, C, F) and experts.w2 (E, F, C).
MIXTRAL_LAYER = "model.layers.{i}."
MIXTRAL_TOP = (
    ("wte", "same", ("model.embed_tokens.weight",)),
    ("ln_f.w", "same", ("model.norm.weight",)),
)
MIXTRAL_BLOCK = (
    ("ln1.w", "same", ("input_layernorm.weight",)),
    ("attn.wqkv", "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ("attn.wo", "T", ("self_attn.o_proj.weight",)),
    ("ln2.w", "same", ("post_attention_layernorm.weight",)),
    ("moe.router.w", "T", ("block_sparse_moe.gate.weight",)),
    ("moe.experts.w1", "experts", ("block_sparse_moe.experts.{e}.w1.weight",)),
    ("moe.experts.w3", "experts", ("block_sparse_moe.experts.{e}.w3.weight",)),
    ("moe.experts.w2", "experts", ("block_sparse_moe.experts.{e}.w2.weight",)),
)

# An untied output head, in both architectures: nn.Linear (V, C) -> our (C, V).
LM_HEAD = ("lm_head", "T", ("lm_head.weight",))

TABLES = {"gpt2": (GPT2_TOP, GPT2_LAYER, GPT2_BLOCK), "mixtral": (MIXTRAL_TOP, MIXTRAL_LAYER, MIXTRAL_BLOCK)}

# Buffers some checkpoints carry that are not parameters: GPT-2's causal mask, old RoPE tables.
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")

# transformers >= 5 names Mixtral's MoE after its modules, with the experts fused:
#   mlp.gate.weight              = block_sparse_moe.gate.weight
#   mlp.experts.gate_up_proj     (E, 2F, C): expert e's rows [w1 | w3]
#   mlp.experts.down_proj        (E, C, F):  expert e's w2
FUSED = re.compile(r"(.*\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


class Entry(NamedTuple):
    ours: str  # our parameter name
    how: str  # same | T | qkv | experts
    theirs: list  # the full HF names it is made of


def name_map(c: Config) -> list:
    """Every parameter of a model of Config c as an Entry, with full HF names (checkpoint names)."""
    top, layer, block = TABLES[family(c)]
    entries = [Entry(ours, how, list(theirs)) for ours, how, theirs in top]
    for i in range(c.n_layer):
        for ours, how, theirs in block:
            names = [layer.format(i=i) + t for t in theirs]
            if how == "experts":
                names = [n.format(e=e) for n in names for e in range(c.n_experts)]
            entries.append(Entry(f"blocks.{i}.{ours}", how, names))
    if not c.tie_embeddings:
        entries.append(Entry(LM_HEAD[0], LM_HEAD[1], list(LM_HEAD[2])))
    return entries


def to_ours(arrays: list, how: str):
    """Our array from their tensors (numpy arrays), following `how`."""
    if how == "same":
        return arrays[0]
    if how == "T":
        return arrays[0].T
    if how == "qkv":
        return numpy.concatenate([a.T for a in arrays], axis=1)
    return numpy.stack([a.T for a in arrays])  # experts


def to_theirs(a, how: str, c: Config) -> list:
    """Their tensors from our array: the inverse of to_ours."""
    if how == "same":
        return [a]
    if how == "T":
        return [a.T]
    if how == "qkv":
        H, Hkv, D = c.n_head, c.n_kv_head, c.head_size
        return [a[:, : H * D].T, a[:, H * D : (H + Hkv) * D].T, a[:, (H + Hkv) * D :].T]
    return [a[e].T for e in range(a.shape[0])]  # experts


def with_gpt2_prefix(sd: dict) -> dict:
    """A bare GPT2Model's names (h.0.ln_1.weight) -> GPT2LMHeadModel's (transformer.h.0.ln_1.weight)."""
    bare = {k for k in sd if not k.startswith("transformer.") and k != "lm_head.weight"}
    return {("transformer." + k if k in bare else k): v for k, v in sd.items()}


def unfuse(sd: dict) -> dict:
    """transformers >= 5 Mixtral names -> checkpoint names (other keys unchanged)."""
    out = {}
    for k, v in sd.items():
        hit = FUSED.match(k)
        if not hit:
            out[k] = v
            continue
        pre, what = hit.group(1) + "block_sparse_moe.", hit.group(2)
        if what == "gate.weight":
            out[pre + "gate.weight"] = v
        elif what == "experts.down_proj":
            for e in range(v.shape[0]):
                out[f"{pre}experts.{e}.w2.weight"] = v[e]
        else:  # gate_up_proj
            F = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}experts.{e}.w1.weight"] = v[e, :F]
                out[f"{pre}experts.{e}.w3.weight"] = v[e, F:]
    return out


def fuse(sd: dict, c: Config) -> dict:
    """Checkpoint names -> transformers >= 5 Mixtral names: the inverse of unfuse."""
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    for i in range(c.n_layer):
        x, y = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        experts = range(c.n_experts)
        out[y + "gate.weight"] = sd[x + "gate.weight"]
        w1_w3 = [
            numpy.concatenate([sd[f"{x}experts.{e}.w1.weight"], sd[f"{x}experts.{e}.w3.weight"]])
            for e in experts
        ]
        out[y + "experts.gate_up_proj"] = numpy.stack(w1_w3)
        out[y + "experts.down_proj"] = numpy.stack([sd[f"{x}experts.{e}.w2.weight"] for e in experts])
    return out
