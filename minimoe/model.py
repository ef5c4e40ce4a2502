"""The GPT: parameters in one flat dict, a forward, and a backward that mirrors it in reverse.

    model = GPT(config, seed=0)
    logits, loss = model.forward(idx, targets)    # idx, targets (B, T) integer
    model.backward()                              # fills model.grads (same keys as model.params)

Block i (pre-norm, as in GPT-2 and Llama):
    x = x + Dropout(Attention(Norm1(x)))
    x = x + Dropout(MLP(Norm2(x)))       # MLP is dense, or a Mixture of Experts (moe.py)
Parameter names (C channels, F hidden, V vocab, E experts):
    wte (V, C) token embedding;  wpe (block_size, C) learned positions (gpt2 flavour)
    blocks.i.ln1.w/.b, blocks.i.attn.wqkv/.bqkv/.wo/.bo, blocks.i.ln2.w/.b
    blocks.i.mlp.w1/.b1/.w2/.b2 (GELU) or blocks.i.mlp.w1/.w3/.w2 (SwiGLU)
    blocks.i.moe.* (MoE blocks, see moe.py);  ln_f.w/.b;  lm_head (C, V) when not tied to wte
"""

from __future__ import annotations

import math

import numpy

from minimoe import backend, moe
from minimoe.config import Config
from minimoe.ops import activation, attention, dropout, embedding, ffn, linear, loss, norm


def _init_params(config: Config, seed: int) -> dict:
    """Host (numpy, float64) initial weights, so every backend starts from identical numbers.

    N(0, init_std) for matrices, with GPT-2's 1/sqrt(2 * n_layer) shrink on the projections that
    write into the residual stream (attn.wo, mlp.w2, experts' w2); ones for norm gains; zeros
    for biases.
    """
    c = config
    rng = numpy.random.default_rng(seed)
    C, V, H, Hkv, D, F = c.n_embd, c.vocab_size, c.n_head, c.n_kv_head, c.head_size, c.ffn_hidden
    std, std_out = c.init_std, c.init_std / math.sqrt(2 * c.n_layer)
    p = {}

    def normal(shape, s):
        return rng.standard_normal(shape) * s

    p["wte"] = normal((V, C), std)
    if c.pos_emb == "learned":
        p["wpe"] = normal((c.block_size, C), std)
    for i in range(c.n_layer):
        pre = f"blocks.{i}."
        p[pre + "ln1.w"] = numpy.ones(C)
        if c.norm == "layernorm":
            p[pre + "ln1.b"] = numpy.zeros(C)
        p[pre + "attn.wqkv"] = normal((C, (H + 2 * Hkv) * D), std)
        if c.bias:
            p[pre + "attn.bqkv"] = numpy.zeros((H + 2 * Hkv) * D)
        p[pre + "attn.wo"] = normal((H * D, C), std_out)
        if c.bias:
            p[pre + "attn.bo"] = numpy.zeros(C)
        p[pre + "ln2.w"] = numpy.ones(C)
        if c.norm == "layernorm":
            p[pre + "ln2.b"] = numpy.zeros(C)
        if c.is_moe_block(i):
            p.update(moe.init_params(c, pre + "moe.", rng, std, std_out))
        else:
            p.update(init_ffn_params(c, pre + "mlp.", C, F, normal, std, std_out))
    p["ln_f.w"] = numpy.ones(C)
    if c.norm == "layernorm":
        p["ln_f.b"] = numpy.zeros(C)
    if not c.tie_embeddings:
        p["lm_head"] = normal((C, V), std)
    return p


def init_ffn_params(c: Config, pre: str, C: int, F: int, normal, std, std_out) -> dict:
    """One dense feed-forward network's weights: GELU MLP (w1, b1, w2, b2) or SwiGLU (w1, w3, w2)."""
    p = {}
    if c.activation == "swiglu":
        p[pre + "w1"] = normal((C, F), std)
        p[pre + "w3"] = normal((C, F), std)
        p[pre + "w2"] = normal((F, C), std_out)
    else:
        p[pre + "w1"] = normal((C, F), std)
        if c.bias:
            p[pre + "b1"] = numpy.zeros(F)
        p[pre + "w2"] = normal((F, C), std_out)
        if c.bias:
            p[pre + "b2"] = numpy.zeros(C)
    return p


def ffn_forward(c: Config, x, p: dict, pre: str):
    """A dense feed-forward network of config `c` with weights p[pre + ...]. (..., C) -> (..., C)."""
    if c.activation == "swiglu":
        return ffn.swiglu_mlp_forward(x, p[pre + "w1"], p[pre + "w3"], p[pre + "w2"])
    approx = "tanh" if c.activation == "gelu" else "none"
    return ffn.gelu_mlp_forward(x, p[pre + "w1"], p.get(pre + "b1"), p[pre + "w2"], p.get(pre + "b2"), approx)


def ffn_backward(c: Config, dy, cache, pre: str, grads: dict):
    """Backward of `ffn_forward`: returns dx and writes the weight gradients into grads."""
    if c.activation == "swiglu":
        dx, grads[pre + "w1"], grads[pre + "w3"], grads[pre + "w2"] = ffn.swiglu_mlp_backward(dy, cache)
        return dx
    dx, dw1, db1, dw2, db2 = ffn.gelu_mlp_backward(dy, cache)
    grads[pre + "w1"], grads[pre + "w2"] = dw1, dw2
    if db1 is not None:
        grads[pre + "b1"], grads[pre + "b2"] = db1, db2
    return dx


class _Recycling(dict):
    """The forward's cache dict: storing an entry drops the previous step's entry of that name."""

    def __init__(self, previous: dict):
        super().__init__()
        self.previous = previous

    def __setitem__(self, name, value):
        self.previous.pop(name, None)
        super().__setitem__(name, value)


class GPT:
    """A GPT-style language model (dense or Mixture-of-Experts) with a hand-written backward."""

    def __init__(self, config: Config, seed: int = 0, dtype: str | None = None):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a minimoe.Config, got {type(config).__name__}")
        if config.counted_only:
            raise ValueError(
                f"Config {config.name or ''} is a published full-size configuration kept for counting only "
                "(count_params); build a toy preset instead"
            )
        config.validate()
        self.config = config
        self.dtype = dtype or backend.get_default_dtype()
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        self.xp = backend.get_xp()
        host = _init_params(config, seed)
        self.params = {k: backend.to_device(v, self.xp, self.dtype) for k, v in host.items()}
        self.grads: dict = {}
        # State that is not trained by the optimizer (e.g. DeepSeek-V3's selection bias).
        self.buffers = {
            k: backend.to_device(v, self.xp, self.dtype) for k, v in moe.init_buffers(config).items()
        }
        self.training = True
        self.rng = backend.make_rng(seed + 1, self.xp)  # dropout masks and router noise
        if config.pos_emb == "rope":
            self._rope = attention.rope_tables(
                config.block_size, config.head_size, config.rope_theta, xp=self.xp, dtype=self.dtype
            )
        self._cache = None
        self.stats: dict = {}

    # ------------------------------------------------------------------ utilities
    def train(self):
        """Training mode: dropout and router noise on."""
        self.training = True
        return self

    def eval(self):
        """Evaluation mode: dropout and router noise off."""
        self.training = False
        return self

    def num_params(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def _check_idx(self, idx, name="idx"):
        """ValueError unless idx is an integer (B, T) array of ids in range. A host (numpy)
        array is checked on the host; a device array costs one copy of its min and max."""
        if not hasattr(idx, "ndim") or idx.ndim != 2:
            raise ValueError(
                f"{name} must be an integer array of shape (B, T), got {getattr(idx, 'shape', type(idx))}"
            )
        if idx.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
        lo = -1 if name == "targets" else 0  # targets may hold ignore_index = -1 (not counted)
        if not idx.size:
            return
        xp = backend.xp_of(idx)
        got_lo, got_hi = backend.to_numpy(xp.stack([idx.min(), idx.max()])).tolist()
        if got_lo < lo or got_hi >= self.config.vocab_size:
            raise ValueError(
                f"{name} holds ids outside [{lo}, {self.config.vocab_size}); got min {got_lo}, max {got_hi}"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) integer -> logits (B, T, V), loss (0-d array, or None without targets).

        The loss is the training objective: the mean token cross-entropy plus, for MoE models,
        aux_loss_coef * (sum of the layers' balancing losses) + z_loss_coef * (sum of z-losses).
        `model.stats` holds the parts (lm_loss, aux_loss, z_loss) and per-layer routing statistics.
        kv_cache: an `attention.KVCache` for generation; its positions advance by T.
        """
        c, p, xp = self.config, self.params, self.xp
        self._check_idx(idx)  # on the host when idx comes from the host (no device sync)
        if not backend.is_cupy_array(idx) and xp is not numpy:
            idx = xp.asarray(idx)  # the batch moves to the device once
        B, T = idx.shape
        pos0 = kv_cache.pos if kv_cache is not None else 0
        if pos0 + T > c.block_size:
            raise ValueError(f"sequence length {pos0 + T} exceeds block_size = {c.block_size}")
        train = self.training and kv_cache is None
        # The last step's activations are freed piece by piece, as this step stores the same
        # piece: peak memory stays near ONE step's worth (not two), and the allocator reuses the
        # freed memory at once. (Freeing them all up front let glibc hand the memory back to the
        # OS, and getting it back cost page faults worth ~15% of a laptop-size step.)
        caches = _Recycling(self._cache or {})
        self._cache = None

        x, caches["wte"] = embedding.embedding_forward(idx, p["wte"])
        if c.pos_emb == "learned":
            x = x + p["wpe"][pos0 : pos0 + T]
        x, caches["drop_emb"] = dropout.dropout_forward(x, c.dropout, self.rng, train)
        rope = None
        if c.pos_emb == "rope":
            rope = (self._rope[0][pos0 : pos0 + T], self._rope[1][pos0 : pos0 + T])

        self.stats = {"layers": []}
        aux_total = z_total = 0.0
        for i in range(c.n_layer):
            pre = f"blocks.{i}."
            h, caches[pre + "ln1"] = self._norm_forward(x, pre + "ln1")
            a, caches[pre + "attn"] = attention.self_attention_forward(
                h, p[pre + "attn.wqkv"], p.get(pre + "attn.bqkv"), p[pre + "attn.wo"], p.get(pre + "attn.bo"),
                c.n_head, c.n_kv_head, rope, None if kv_cache is None else (kv_cache, i),
            )  # fmt: skip
            a, caches[pre + "drop1"] = dropout.dropout_forward(a, c.dropout, self.rng, train)
            x = x + a
            h, caches[pre + "ln2"] = self._norm_forward(x, pre + "ln2")
            if c.is_moe_block(i):
                m, caches[pre + "moe"], st = moe.moe_forward(
                    c, h, p, self.buffers, pre + "moe.", self.rng, train
                )
                st["layer"] = i
                self.stats["layers"].append(st)
                aux_total = aux_total + st["aux_loss"]
                z_total = z_total + st["z_loss"]
            else:
                m, caches[pre + "mlp"] = ffn_forward(c, h, p, pre + "mlp.")
            m, caches[pre + "drop2"] = dropout.dropout_forward(m, c.dropout, self.rng, train)
            x = x + m
        x, caches["ln_f"] = self._norm_forward(x, "ln_f")
        head = p["wte"].T if c.tie_embeddings else p["lm_head"]
        logits, caches["head"] = linear.linear_forward(x, head)

        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:
            self._cache = None
            return logits, None
        self._check_idx(targets, "targets")
        if not backend.is_cupy_array(targets) and xp is not numpy:
            targets = xp.asarray(targets)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {idx.shape}, got {targets.shape}")
        lm_loss, caches["loss"] = loss.cross_entropy_forward(logits, targets)
        total = lm_loss
        if c.n_experts > 0:
            total = lm_loss + c.aux_loss_coef * aux_total + c.z_loss_coef * z_total
            self.stats.update(aux_loss=aux_total, z_loss=z_total)
        self.stats["lm_loss"] = lm_loss
        self._cache = dict(caches)
        return logits, total

    def _norm_forward(self, x, name):
        p = self.params
        if self.config.norm == "layernorm":
            return norm.layernorm_forward(x, p[name + ".w"], p[name + ".b"], self.config.norm_eps)
        return norm.rmsnorm_forward(x, p[name + ".w"], self.config.norm_eps)

    def _norm_backward(self, dy, cache, name):
        if self.config.norm == "layernorm":
            dx, self.grads[name + ".w"], self.grads[name + ".b"] = norm.layernorm_backward(dy, cache)
        else:
            dx, self.grads[name + ".w"] = norm.rmsnorm_backward(dy, cache)
        return dx

    # ------------------------------------------------------------------ backward
    def backward(self):
        """Gradients of the last forward's loss with respect to every parameter -> model.grads.

        Walks the forward in reverse. The residual stream's gradient dx flows straight through
        each `x = x + f(x)` and picks up f's contribution on the way.
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        c, p, caches = self.config, self.params, self._cache
        g = self.grads = {}

        dlogits = loss.cross_entropy_backward(1.0, caches["loss"])
        dx, dhead, _ = linear.linear_backward(dlogits, caches["head"])
        if c.tie_embeddings:
            dwte_head = dhead.T  # the head is wte^T: its gradient joins the embedding's below
        else:
            g["lm_head"] = dhead
        dx = self._norm_backward(dx, caches["ln_f"], "ln_f")

        for i in reversed(range(c.n_layer)):
            pre = f"blocks.{i}."
            dm = dropout.dropout_backward(dx, caches[pre + "drop2"])
            if c.is_moe_block(i):
                dh = moe.moe_backward(c, dm, caches[pre + "moe"], pre + "moe.", g)
            else:
                dh = ffn_backward(c, dm, caches[pre + "mlp"], pre + "mlp.", g)
            dx = dx + self._norm_backward(dh, caches[pre + "ln2"], pre + "ln2")
            da = dropout.dropout_backward(dx, caches[pre + "drop1"])
            dh, g[pre + "attn.wqkv"], dbqkv, g[pre + "attn.wo"], dbo = attention.self_attention_backward(
                da, caches[pre + "attn"]
            )
            if dbqkv is not None:
                g[pre + "attn.bqkv"], g[pre + "attn.bo"] = dbqkv, dbo
            dx = dx + self._norm_backward(dh, caches[pre + "ln1"], pre + "ln1")

        dx = dropout.dropout_backward(dx, caches["drop_emb"])
        if c.pos_emb == "learned":
            T = dx.shape[1]
            dwpe = self.xp.zeros_like(p["wpe"])
            dwpe[:T] = dx.sum(axis=0)
            g["wpe"] = dwpe
        g["wte"] = embedding.embedding_backward(dx, caches["wte"])
        if c.tie_embeddings:
            g["wte"] += dwte_head
        # keep the order of model.params (optimizers and checkpoints walk it)
        self.grads = {k: g[k] for k in p}
        return self.grads

    # ------------------------------------------------------------------ MoE upkeep
    def update_router_biases(self):
        """DeepSeek-V3 auxiliary-loss-free balancing: after an optimizer step, nudge each MoE
        layer's selection bias towards balance (not a gradient step; see moe.update_bias)."""
        for st in self.stats.get("layers", []):
            moe.update_bias(self.config, self.buffers, f"blocks.{st['layer']}.moe.", st)


_ = activation  # re-exported ops used by lessons through this module
