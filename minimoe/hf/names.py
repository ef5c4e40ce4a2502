"""Which Hugging Face tensors make each minimoe parameter, and how: the name maps as tables.

Each row reads: our parameter name(s), how our array is made from theirs, their tensor name(s).
    same       copied as is
    T          transposed (nn.Linear stores (out, in); our linear layers take (in, out))
    qkv        q, k, v projections (out, in) -> the column blocks [q^T | k^T | v^T], (C, (H + 2 Hkv) D)
    cat        q, k, v biases -> one vector [bq | bk | bv], ((H + 2 Hkv) D,)
    experts    one (out, in) tensor per expert e -> their transposes stacked, (E, in, out)
    stacked_T  one (E, out, in) tensor -> (E, in, out)
    gate_up    one (E, 2F, C) tensor of rows [gate | up] -> our experts.w1 and .w3, (E, C, F) each
    halves_T   one (2F, C) tensor of rows [gate | up] -> our w1 and w3, (C, F) each
    q_rope     DeepSeek-V3's query projection: T, and each head's RoPE columns from DeepSeek's
               interleaved pairs to our rotate-halves layout (ops/mla.rope_interleave_perm)
    kv_rope    DeepSeek-V3's kv_a_proj_with_mqa: T, and the RoPE key's columns likewise
Block rows are relative to the block's prefix ({i}: the block number); "{e}" is the expert number.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy

from minimoe.config import Config
from minimoe.errors import ConfigError

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

# The llama-like MoE families, under the names of the Hub's checkpoint files. HF's checkpoints use
# the "rotate halves" RoPE layout (their q/k rows are permuted from Meta's interleaved pairs), which
# is ours, so no permutation is needed. A row whose parameter a Config does not have (a bias, a
# QK-norm gain, a dense block's MLP in an MoE block, ...) is skipped: every block's rows are listed
# once and each block takes those it has.
LLAMA_LAYER = "model.layers.{i}."
LLAMA_TOP = (
    ("wte", "same", ("model.embed_tokens.weight",)),
    ("ln_f.w", "same", ("model.norm.weight",)),
)
LLAMA_ATTENTION = (
    ("ln1.w", "same", ("input_layernorm.weight",)),
    ("attn.wqkv", "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ("attn.bqkv", "cat", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    ("attn.wo", "T", ("self_attn.o_proj.weight",)),
    ("attn.bo", "same", ("self_attn.o_proj.bias",)),
    ("attn.q_norm.w", "same", ("self_attn.q_norm.weight",)),  # OLMoE (H D,), Qwen3-MoE (D,)
    ("attn.k_norm.w", "same", ("self_attn.k_norm.weight",)),
    ("ln2.w", "same", ("post_attention_layernorm.weight",)),
)
# The dense SwiGLU MLP of Qwen's mlp_only_layers and DeepSeek's first dense blocks.
LLAMA_MLP = (
    ("mlp.w1", "T", ("mlp.gate_proj.weight",)),
    ("mlp.w3", "T", ("mlp.up_proj.weight",)),
    ("mlp.w2", "T", ("mlp.down_proj.weight",)),
)
# Mixtral: the router gate (E, C) becomes router.w (C, E); expert e's w1/w3 (F, C) and w2 (C, F)
# stack into experts.w1/w3 (E, C, F) and experts.w2 (E, F, C).
MIXTRAL_MOE = (
    ("moe.router.w", "T", ("block_sparse_moe.gate.weight",)),
    ("moe.experts.w1", "experts", ("block_sparse_moe.experts.{e}.w1.weight",)),
    ("moe.experts.w3", "experts", ("block_sparse_moe.experts.{e}.w3.weight",)),
    ("moe.experts.w2", "experts", ("block_sparse_moe.experts.{e}.w2.weight",)),
)
# OLMoE, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 name their experts like Llama's MLP.
QWEN_MOE = (
    ("moe.router.w", "T", ("mlp.gate.weight",)),
    ("moe.router_bias", "same", ("mlp.gate.e_score_correction_bias",)),  # DeepSeek-V3's buffer
    ("moe.experts.w1", "experts", ("mlp.experts.{e}.gate_proj.weight",)),
    ("moe.experts.w3", "experts", ("mlp.experts.{e}.up_proj.weight",)),
    ("moe.experts.w2", "experts", ("mlp.experts.{e}.down_proj.weight",)),
)
QWEN2_SHARED = (  # one shared expert behind a sigmoid gate (1, C) -> shared_gate.w (C, 1)
    ("moe.shared.w1", "T", ("mlp.shared_expert.gate_proj.weight",)),
    ("moe.shared.w3", "T", ("mlp.shared_expert.up_proj.weight",)),
    ("moe.shared.w2", "T", ("mlp.shared_expert.down_proj.weight",)),
    ("moe.shared_gate.w", "T", ("mlp.shared_expert_gate.weight",)),
)
DEEPSEEK_SHARED = (  # n_shared_experts side by side: one MLP of width n_shared_experts * F
    ("moe.shared.w1", "T", ("mlp.shared_experts.gate_proj.weight",)),
    ("moe.shared.w3", "T", ("mlp.shared_experts.up_proj.weight",)),
    ("moe.shared.w2", "T", ("mlp.shared_experts.down_proj.weight",)),
)
# Granite-MoE stores its experts stacked: input_linear (E, 2F, C) holds each expert's [w1 | w3] rows,
# output_linear (E, C, F) its w2; the shared MLP (Granite-MoE-Shared) likewise, (2 F_s, C) and (C, F_s).
GRANITE_MOE = (
    ("moe.router.w", "T", ("block_sparse_moe.router.layer.weight",)),
    (("moe.experts.w1", "moe.experts.w3"), "gate_up", ("block_sparse_moe.input_linear.weight",)),
    ("moe.experts.w2", "stacked_T", ("block_sparse_moe.output_linear.weight",)),
    (("moe.shared.w1", "moe.shared.w3"), "halves_T", ("shared_mlp.input_linear.weight",)),
    ("moe.shared.w2", "T", ("shared_mlp.output_linear.weight",)),
)

# DeepSeek-V3: Multi-head Latent Attention (layers/mla.py has the shapes), then Llama's MLP in its
# first dense blocks and Qwen-style experts, the selection bias and n_shared_experts side by side.
DEEPSEEK_ATTENTION = (
    ("ln1.w", "same", ("input_layernorm.weight",)),
    ("attn.wq", "q_rope", ("self_attn.q_proj.weight",)),  # q_lora_rank 0: a direct query
    ("attn.wq_a", "T", ("self_attn.q_a_proj.weight",)),
    ("attn.q_a_norm.w", "same", ("self_attn.q_a_layernorm.weight",)),
    ("attn.wq_b", "q_rope", ("self_attn.q_b_proj.weight",)),
    ("attn.wkv_a", "kv_rope", ("self_attn.kv_a_proj_with_mqa.weight",)),
    ("attn.kv_a_norm.w", "same", ("self_attn.kv_a_layernorm.weight",)),
    ("attn.wkv_b", "T", ("self_attn.kv_b_proj.weight",)),
    ("attn.wo", "T", ("self_attn.o_proj.weight",)),
    ("ln2.w", "same", ("post_attention_layernorm.weight",)),
)

# An untied output head, in every architecture: nn.Linear (V, C) -> our (C, V).
LM_HEAD = ("lm_head", "T", ("lm_head.weight",))

_LLAMA = (LLAMA_TOP, LLAMA_LAYER)
TABLES = {  # model_type -> (top rows, layer prefix, block rows)
    "gpt2": (GPT2_TOP, GPT2_LAYER, GPT2_BLOCK),
    "mixtral": (*_LLAMA, LLAMA_ATTENTION + MIXTRAL_MOE),
    "olmoe": (*_LLAMA, LLAMA_ATTENTION + QWEN_MOE),
    "qwen2_moe": (*_LLAMA, LLAMA_ATTENTION + LLAMA_MLP + QWEN_MOE + QWEN2_SHARED),
    "qwen3_moe": (*_LLAMA, LLAMA_ATTENTION + LLAMA_MLP + QWEN_MOE),
    "granitemoe": (*_LLAMA, LLAMA_ATTENTION + GRANITE_MOE),
    "granitemoeshared": (*_LLAMA, LLAMA_ATTENTION + GRANITE_MOE),
    "deepseek_v3": (*_LLAMA, DEEPSEEK_ATTENTION + LLAMA_MLP + QWEN_MOE + DEEPSEEK_SHARED),
}

# Buffers some checkpoints carry that are not parameters: GPT-2's causal mask, old RoPE tables.
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")

# transformers >= 5 names the MoE tensors after its modules, with the experts fused (E, ...):
# (module name, how, checkpoint names), relative to an MoE block's prefix. gate_up: expert e's
# rows [gate | up] of gate_up_proj (E, 2F, C); stack: expert e's down_proj (E, C, F); rename: the
# same tensor under another name.
_QWEN_FUSED = (
    (
        "mlp.experts.gate_up_proj",
        "gate_up",
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
    ),
    ("mlp.experts.down_proj", "stack", ("mlp.experts.{e}.down_proj.weight",)),
)
FUSED = {
    "mixtral": (
        ("mlp.gate.weight", "rename", ("block_sparse_moe.gate.weight",)),
        (
            "mlp.experts.gate_up_proj",
            "gate_up",
            ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
        ),
        ("mlp.experts.down_proj", "stack", ("block_sparse_moe.experts.{e}.w2.weight",)),
    ),
    "olmoe": _QWEN_FUSED,
    "qwen2_moe": _QWEN_FUSED,
    "qwen3_moe": _QWEN_FUSED,
    "granitemoe": (
        ("block_sparse_moe.experts.gate_up_proj", "rename", ("block_sparse_moe.input_linear.weight",)),
        ("block_sparse_moe.experts.down_proj", "rename", ("block_sparse_moe.output_linear.weight",)),
        ("block_sparse_moe.router.weight", "rename", ("block_sparse_moe.router.layer.weight",)),
    ),
}
FUSED["granitemoeshared"] = FUSED["granitemoe"]
FUSED["deepseek_v3"] = _QWEN_FUSED


class Entry(NamedTuple):
    ours: tuple  # our parameter (or buffer) name(s)
    how: str  # same | T | qkv | cat | experts | gate_up | stacked_T | halves_T | q_rope | kv_rope
    theirs: list  # the full HF names it is made of


def name_map(c: Config, kind: str, have, rope_interleave: bool = True) -> list:
    """Every parameter (and buffer) in `have` (our names) of a model of Config c as an Entry of
    HF architecture `kind`, with full HF checkpoint names. ConfigError when one of `have` has no row.
    rope_interleave=False (a DeepSeek config.json saying so): the RoPE columns are already ours."""
    top, layer, block = TABLES[kind]
    rows = [(ours, how, theirs, "") for ours, how, theirs in top]
    for i in range(c.n_layer):
        rows += [(ours, how, theirs, i) for ours, how, theirs in block]
    if not c.tie_embeddings:
        rows.append((*LM_HEAD, ""))
    entries, covered = [], set()
    for ours, how, theirs, i in rows:
        ours = (ours,) if isinstance(ours, str) else ours
        if i != "":
            ours = tuple(f"blocks.{i}.{o}" for o in ours)
            theirs = [layer.format(i=i) + t for t in theirs]
        if not all(o in have for o in ours):
            continue
        if how == "experts":
            theirs = [n.format(e=e) for n in theirs for e in range(c.n_experts)]
        if how in ("q_rope", "kv_rope") and not rope_interleave:
            how = "T"
        entries.append(Entry(ours, how, list(theirs)))
        covered.update(ours)
    unmapped = sorted(set(have) - covered)
    if unmapped:
        raise ConfigError(f"{kind} has no tensor for {unmapped[0]!r}; its Config has a feature {kind} lacks")
    return entries


def rope_columns(how: str, c: Config) -> list:
    """Our column j of a DeepSeek-V3 projection is their row cols[j]: each query head is
    [nope (dn) | rope (dr)], kv_a is [latent (rkv) | rope key (dr)], and a RoPE part's columns
    are their interleaved pairs reordered to rotate-halves, perm = [0, 2, 4, ..., 1, 3, 5, ...]."""
    dn, dr = c.qk_nope_head_dim, c.qk_rope_head_dim
    perm = list(range(0, dr, 2)) + list(range(1, dr, 2))  # = ops.mla.rope_interleave_perm(dr)
    if how == "kv_rope":
        return list(range(c.kv_lora_rank)) + [c.kv_lora_rank + j for j in perm]
    return [h * (dn + dr) + j for h in range(c.n_head) for j in list(range(dn)) + [dn + p for p in perm]]


def to_ours(arrays: list, how: str, c: Config) -> list:
    """Our array(s) from their tensors (numpy arrays), following `how`."""
    a = arrays[0]
    if how == "same":
        return [a]
    if how in ("q_rope", "kv_rope"):
        return [a.T[:, rope_columns(how, c)]]
    if how == "T":
        return [a.T]
    if how == "qkv":
        return [numpy.concatenate([x.T for x in arrays], axis=1)]
    if how == "cat":
        return [numpy.concatenate(arrays)]
    if how == "experts":
        return [numpy.stack([x.T for x in arrays])]
    if how == "stacked_T":  # (E, out, in) -> (E, in, out)
        return [a.transpose(0, 2, 1)]
    F = a.shape[-2] // 2
    if how == "gate_up":  # (E, 2F, C) -> w1, w3 (E, C, F)
        return [a[:, :F].transpose(0, 2, 1), a[:, F:].transpose(0, 2, 1)]
    return [a[:F].T, a[F:].T]  # halves_T: (2F, C) -> w1, w3 (C, F)


def to_theirs(ours: list, how: str, c: Config) -> list:
    """Their tensors from our array(s): the inverse of to_ours."""
    a = ours[0]
    if how == "same":
        return [a]
    if how == "T":
        return [a.T]
    if how in ("q_rope", "kv_rope"):
        return [a[:, numpy.argsort(rope_columns(how, c))].T]
    if how in ("qkv", "cat"):
        H, Hkv, D = c.n_head, c.n_kv_head, c.head_size
        cuts = numpy.cumsum([H * D, Hkv * D])
        parts = numpy.split(a, cuts, axis=-1)
        return [p.T for p in parts] if how == "qkv" else parts
    if how == "experts":
        return [a[e].T for e in range(a.shape[0])]
    if how == "stacked_T":
        return [a.transpose(0, 2, 1)]
    if how == "gate_up":
        return [numpy.concatenate([ours[0], ours[1]], axis=-1).transpose(0, 2, 1)]
    return [numpy.concatenate([ours[0], ours[1]], axis=-1).T]  # halves_T


def with_gpt2_prefix(sd: dict) -> dict:
    """A bare GPT2Model's names (h.0.ln_1.weight) -> GPT2LMHeadModel's (transformer.h.0.ln_1.weight)."""
    bare = {k for k in sd if not k.startswith("transformer.") and k != "lm_head.weight"}
    return {("transformer." + k if k in bare else k): v for k, v in sd.items()}


_LAYER_KEY = re.compile(r"^(model\.layers\.\d+\.)(.+)$")


def unfuse(sd: dict, kind: str) -> dict:
    """transformers >= 5 module names of architecture `kind` -> checkpoint names (other keys unchanged)."""
    fused = {module: (how, names) for module, how, names in FUSED.get(kind, ())}
    out = {}
    for k, v in sd.items():
        hit = _LAYER_KEY.match(k)
        if not hit or hit.group(2) not in fused:
            out[k] = v
            continue
        pre, (how, names) = hit.group(1), fused[hit.group(2)]
        if how == "rename":
            out[pre + names[0]] = v
        elif how == "stack":
            out.update({pre + names[0].format(e=e): v[e] for e in range(v.shape[0])})
        else:  # gate_up
            F = v.shape[1] // 2
            out.update({pre + names[0].format(e=e): v[e, :F] for e in range(v.shape[0])})
            out.update({pre + names[1].format(e=e): v[e, F:] for e in range(v.shape[0])})
    return out


def fuse(sd: dict, c: Config, kind: str) -> dict:
    """Checkpoint names -> transformers >= 5 module names: the inverse of unfuse."""
    out = dict(sd)
    for i in range(c.n_layer):
        if not c.is_moe_block(i):
            continue
        pre = LLAMA_LAYER.format(i=i)
        for module, how, names in FUSED.get(kind, ()):
            if how == "rename":
                out[pre + module] = out.pop(pre + names[0])
                continue
            per_expert = [[out.pop(pre + n.format(e=e)) for n in names] for e in range(c.n_experts)]
            out[pre + module] = numpy.stack([numpy.concatenate(parts) for parts in per_expert])
    return out
