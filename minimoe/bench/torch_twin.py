"""A plain PyTorch (eager) twin of minimoe's GPT, for side-by-side checks and benchmarks.

Importing this module needs torch (`pip install 'minimoe[compare]'`); only `minimoe bench
--vs-torch` (through bench.timing.load_twin), the benchmarks and tests/test_bench.py import it.
It is written the way such models usually are, so that `minimoe bench --vs-torch` compares
minimoe with what a PyTorch user would write: nn.Modules, nn.Linear (weights stored (out, in)),
F.scaled_dot_product_attention, RoPE with `rotate_half`, and a Mixture of Experts that loops
over the experts and gathers/scatters their tokens with index_select / index_add_ (the pattern of
Hugging Face's Mixtral sparse block). Weights are copied from a minimoe GPT, so logits, loss and
gradients can be compared number for number:

    ref = TorchGPT.from_minimoe(model)          # same config, same weights, same dtype
    logits, loss = ref(idx, targets)            # torch tensors
    loss.backward()
    grads = ref.grads_as_minimoe()              # numpy arrays, minimoe's names and layouts

Covers both flavours (gpt2, llama), grouped-query attention, dense and MoE blocks with the
softmax (renormalised or not) and DeepSeek-V3 sigmoid_bias routers, shared experts, the
balancing and z losses. Not covered (ConfigError): dropout, the noisy router, expert capacity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minimoe.backend import to_numpy
from minimoe.errors import ConfigError
from minimoe.optim import default_decay

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_supported(c):
    if c.dropout:
        raise ConfigError(f"the torch twin has no dropout; got dropout = {c.dropout}")
    if c.n_experts and c.router == "noisy":
        raise ConfigError("the torch twin has no noisy router; use router 'softmax' or 'sigmoid_bias'")
    if c.n_experts and c.capacity_factor:
        raise ConfigError(f"the torch twin is dropless; got capacity_factor = {c.capacity_factor}")
    _check_family_features(c)


# The real families' features (docs/families.md) the twin does not build, with the plain value it
# computes; MoE-only ones are checked on MoE models only. Refused rather than timed as other work.
_PLAIN = dict(attention="mha", head_dim=None, qkv_bias=None, qk_norm="none", embedding_multiplier=1.0,
              attention_multiplier=None, residual_multiplier=1.0, logits_scaling=1.0)  # fmt: skip
_PLAIN_MOE = dict(shared_gate=False, n_group=1, routed_scaling_factor=1.0, router_logit_bias=False,
                  router_jitter=0.0)  # fmt: skip


def _check_family_features(c):
    plain = dict(_PLAIN, qkv_bias=c.bias, activation=c.activation if c.activation != "relu" else "swiglu")
    if c.n_experts:
        plain.update(_PLAIN_MOE)
        if c.router == "sigmoid_bias":
            plain["renormalize"] = True
    for field, want in plain.items():
        if getattr(c, field) != want:
            raise ConfigError(
                f"the torch twin does not build {field} = {getattr(c, field)!r} (only {want!r})"
            )


def _norm(c, dtype):
    if c.norm == "layernorm":
        return nn.LayerNorm(c.n_embd, eps=c.norm_eps, dtype=dtype)
    return nn.RMSNorm(c.n_embd, eps=c.norm_eps, dtype=dtype)


class FFN(nn.Module):
    """GELU MLP (w1, w2 with biases when c.bias) or SwiGLU (w1 gate, w3 up, w2 down)."""

    def __init__(self, c, hidden, dtype, bias=None):
        super().__init__()
        bias = c.bias if bias is None else bias
        self.act = c.activation
        glu = c.activation == "swiglu"
        self.w1 = nn.Linear(c.n_embd, hidden, bias=bias and not glu, dtype=dtype)
        self.w2 = nn.Linear(hidden, c.n_embd, bias=bias and not glu, dtype=dtype)
        self.w3 = nn.Linear(c.n_embd, hidden, bias=False, dtype=dtype) if glu else None

    def forward(self, x):
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh" if self.act == "gelu" else "none"))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c, dtype):
        super().__init__()
        self.H, self.Hkv, self.D = c.n_head, c.n_kv_head, c.head_size
        self.qkv = nn.Linear(c.n_embd, (self.H + 2 * self.Hkv) * self.D, bias=c.bias, dtype=dtype)
        self.o = nn.Linear(self.H * self.D, c.n_embd, bias=c.bias, dtype=dtype)

    def forward(self, x, rope):
        B, T, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            cos, sin = rope  # (T, D), each half repeated
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if Hkv != H:  # query head h reads key/value head h // (H / Hkv)
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))


class MoE(nn.Module):
    """Router -> top-k -> a loop over experts (index_select in, index_add_ out) [+ shared FFN]."""

    def __init__(self, c, dtype):
        super().__init__()
        self.c = c
        self.router = nn.Linear(c.n_embd, c.n_experts, bias=False, dtype=dtype)
        self.experts = nn.ModuleList(FFN(c, c.expert_hidden, dtype, bias=False) for _ in range(c.n_experts))
        self.shared = FFN(c, c.n_shared_experts * c.shared_hidden, dtype) if c.n_shared_experts else None
        self.register_buffer("router_bias", torch.zeros(c.n_experts, dtype=dtype))

    def forward(self, h):
        c = self.c
        B, T, C = h.shape
        x = h.reshape(-1, C)
        E, K, N = c.n_experts, c.top_k, x.shape[0]
        logits = self.router(x)  # (N, E)
        if c.router == "sigmoid_bias":
            s = torch.sigmoid(logits)
            idx = torch.topk(s + self.router_bias, K, dim=-1).indices
            chosen = s.gather(1, idx)
            gates = chosen / chosen.sum(-1, keepdim=True)
            probs = s / s.sum(-1, keepdim=True)
        else:
            probs = F.softmax(logits, dim=-1)
            gates, idx = torch.topk(probs, K, dim=-1)
            if c.renormalize:
                gates = gates / gates.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, rank = torch.where(idx == e)  # the tokens that chose e, and as which choice
            if token.numel() == 0:
                continue
            out = expert(x.index_select(0, token)) * gates[token, rank].unsqueeze(-1)
            y.index_add_(0, token, out)
        if self.shared is not None:
            y = y + self.shared(x)
        f = torch.bincount(idx.reshape(-1), minlength=E).to(x.dtype) / (N * K)
        aux = E * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return y.view(B, T, C), aux, z


class Block(nn.Module):
    def __init__(self, c, i, dtype):
        super().__init__()
        self.ln1, self.ln2 = _norm(c, dtype), _norm(c, dtype)
        self.attn = Attention(c, dtype)
        self.moe = MoE(c, dtype) if c.is_moe_block(i) else None
        self.mlp = None if self.moe is not None else FFN(c, c.ffn_hidden, dtype)

    def forward(self, x, rope):
        x = x + self.attn(self.ln1(x), rope)
        if self.moe is None:
            return x + self.mlp(self.ln2(x)), None, None
        m, aux, z = self.moe(self.ln2(x))
        return x + m, aux, z


class TorchGPT(nn.Module):
    def __init__(self, config, dtype="float32"):
        super().__init__()
        c = self.config = config
        _check_supported(c)
        dt = _DTYPES[dtype]
        self.wte = nn.Embedding(c.vocab_size, c.n_embd, dtype=dt)
        self.wpe = nn.Embedding(c.block_size, c.n_embd, dtype=dt) if c.pos_emb == "learned" else None
        self.blocks = nn.ModuleList(Block(c, i, dt) for i in range(c.n_layer))
        self.ln_f = _norm(c, dt)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False, dtype=dt)
        if c.pos_emb == "rope":  # the same float64 angles as minimoe's rope_tables, then cast
            half = torch.arange(0, c.head_size // 2, dtype=torch.float64)
            inv = 1.0 / (c.rope_theta ** (half * 2 / c.head_size))
            ang = torch.arange(c.block_size, dtype=torch.float64)[:, None] * inv[None, :]
            ang = torch.cat((ang, ang), dim=-1)
            self.register_buffer("cos", ang.cos().to(dt), persistent=False)
            self.register_buffer("sin", ang.sin().to(dt), persistent=False)

    def forward(self, idx, targets=None):
        """idx (B, T) long -> logits (B, T, V), loss (the same objective as minimoe's) or None."""
        c = self.config
        T = idx.shape[1]
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[:T]
        rope = (self.cos[:T], self.sin[:T]) if c.pos_emb == "rope" else None
        aux = z = 0.0
        for block in self.blocks:
            x, a, zz = block(x, rope)
            if a is not None:
                aux, z = aux + a, z + zz
        x = self.ln_f(x)
        logits = self.lm_head(x) if self.lm_head is not None else x @ self.wte.weight.T
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, c.vocab_size), targets.reshape(-1), ignore_index=-1)
        if c.n_experts:
            loss = loss + c.aux_loss_coef * aux + c.z_loss_coef * z
        return logits, loss

    # ------------------------------------------------------------ minimoe <-> torch weights
    def _pairs(self):
        """minimoe name -> (list of torch tensors, transpose?). Stacked experts map to E tensors."""
        c, out = self.config, {}
        out["wte"] = ([self.wte.weight], False)
        if self.wpe is not None:
            out["wpe"] = ([self.wpe.weight], False)

        def norm(pre, m):
            out[pre + ".w"] = ([m.weight], False)
            if c.norm == "layernorm":
                out[pre + ".b"] = ([m.bias], False)

        def ffn(pre, f):
            for n in ("w1", "w2", "w3"):
                lin = getattr(f, n)
                if lin is not None:
                    out[pre + n] = ([lin.weight], True)
                    if lin.bias is not None:
                        out[pre + "b" + n[1]] = ([lin.bias], False)

        for i, b in enumerate(self.blocks):
            pre = f"blocks.{i}."
            norm(pre + "ln1", b.ln1)
            out[pre + "attn.wqkv"] = ([b.attn.qkv.weight], True)
            out[pre + "attn.wo"] = ([b.attn.o.weight], True)
            if c.bias:
                out[pre + "attn.bqkv"] = ([b.attn.qkv.bias], False)
                out[pre + "attn.bo"] = ([b.attn.o.bias], False)
            norm(pre + "ln2", b.ln2)
            if b.moe is None:
                ffn(pre + "mlp.", b.mlp)
                continue
            out[pre + "moe.router.w"] = ([b.moe.router.weight], True)
            for n in ("w1", "w2", "w3"):
                if getattr(b.moe.experts[0], n) is not None:
                    out[pre + "moe.experts." + n] = ([getattr(e, n).weight for e in b.moe.experts], True)
            if b.moe.shared is not None:
                ffn(pre + "moe.shared.", b.moe.shared)
        norm("ln_f", self.ln_f)
        if self.lm_head is not None:
            out["lm_head"] = ([self.lm_head.weight], True)
        return out

    @classmethod
    def from_minimoe(cls, model):
        """A TorchGPT with the config, dtype and (copied) weights and router biases of a minimoe GPT."""
        ref = cls(model.config, model.dtype)
        pairs = ref._pairs()
        if set(pairs) != set(model.params):
            raise ValueError(f"parameter names differ: {sorted(set(pairs) ^ set(model.params))}")
        with torch.no_grad():
            for name, (tensors, transpose) in pairs.items():
                w = to_numpy(model.params[name])
                parts = [w] if len(tensors) == 1 else list(w)  # stacked experts (E, ., .)
                for t, a in zip(tensors, parts):
                    t.copy_(torch.from_numpy(np.ascontiguousarray(a.T if transpose else a)))
            for name, b in model.buffers.items():  # DeepSeek-V3 selection biases
                i = int(name.split(".")[1])
                ref.blocks[i].moe.router_bias.copy_(torch.from_numpy(to_numpy(b)))
        return ref

    def grads_as_minimoe(self) -> dict:
        """The .grad of every parameter, as numpy arrays with minimoe's names and layouts."""
        out = {}
        for name, (tensors, transpose) in self._pairs().items():
            gs = [(t.grad if t.grad is not None else torch.zeros_like(t)).detach().numpy() for t in tensors]
            gs = [g.T if transpose else g for g in gs]
            out[name] = gs[0] if len(gs) == 1 else np.stack(gs)
        return out

    def make_optimizer(self, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        """torch.optim.AdamW with the parameter groups of minimoe's default (decay on matrices,
        not on embeddings, norm gains or biases)."""
        decay, no_decay, seen = [], [], set()
        for name, (tensors, _) in self._pairs().items():
            for t in tensors:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                ndim = 3 if ".experts." in name else t.ndim  # minimoe sees stacked experts
                (decay if default_decay(name, _Shape(ndim)) else no_decay).append(t)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class _Shape:
    def __init__(self, ndim):
        self.ndim = ndim
