"""The GPT: parameters in one flat dict, a forward, and a backward that mirrors it in reverse.

    model = GPT(config, seed=0)
    logits, loss = model.forward(idx, targets)    # idx, targets (B, T) integer
    model.backward()                              # fills model.grads (same keys as model.params)

Block i (pre-norm, as in GPT-2 and Llama):
    x = x + Dropout(Attention(Norm1(x)))
    x = x + Dropout(MLP(Norm2(x)))       # MLP: dense (layers/ffn.py) or MoE (layers/moe.py)
Granite's muP-style scalars (Config, 1 elsewhere): x0 = embedding_multiplier * wte[idx], each
branch enters the residual as residual_multiplier * f(...), logits = Norm(x) W_head / logits_scaling.
Parameter names (C channels, F hidden, V vocab, E experts):
    wte (V, C) token embedding;  wpe (block_size, C) learned positions (gpt2 flavour)
    blocks.i.ln1.w/.b, blocks.i.attn.wqkv/.bqkv/.wo/.bo(/.q_norm.w/.k_norm.w with QK-norm), blocks.i.ln2.w/.b
    blocks.i.attn.wq_a/.q_a_norm.w/.wq_b/.wkv_a/.kv_a_norm.w/.wkv_b/.wo with attention="mla"
        (or .wq for a direct query; layers/mla.py)
    blocks.i.mlp.w1/.b1/.w2/.b2 (GELU) or blocks.i.mlp.w1/.w3/.w2 (SwiGLU)
    blocks.i.moe.* (MoE blocks, see layers/moe.py);  ln_f.w/.b;  lm_head (C, V) when not tied to wte
The attention block is layers/attention.py; the forward's caches live in a `StepCaches` (below).
"""

from __future__ import annotations

import math

import numpy

from minimoe import backend
from minimoe.config import Config
from minimoe.layers import attention, exchange, ffn, mla, moe
from minimoe.layers.params import init_params, param_shapes
from minimoe.ops import dropout, embedding, linear, loss, norm
from minimoe.ops.attention import rope_tables


def _scale(x, s: float):
    """x * s, or x itself when s = 1 (the muP-style multipliers are 1 outside Granite)."""
    return x if s == 1.0 else x * s


class StepCaches(dict):
    """The caches one forward leaves for its backward, {name: cache}, recycled step by step.

    Storing `caches[name] = ...` drops the PREVIOUS step's entry of that name, so last step's
    activations are freed piece by piece as this step makes the same piece: peak memory stays
    near ONE step's worth (not two), and the allocator hands the freed blocks straight back.
    Why not simply free the whole previous cache before the forward? Then glibc returned the
    memory to the OS, and faulting it back in cost ~15% of a laptop-size training step.
    """

    def __init__(self, previous: dict | None):
        super().__init__()
        self._previous = previous if previous is not None else {}

    def __setitem__(self, name, value):
        self._previous.pop(name, None)
        super().__setitem__(name, value)

    def done(self) -> dict:
        """This step's caches as a plain dict; what is left of the previous step is let go."""
        self._previous = {}
        return dict(self)


class GPT:
    """A GPT-style language model (dense or Mixture-of-Experts) with a hand-written backward."""

    def __init__(self, config: Config, seed: int = 0, dtype: str | None = None, params: dict | None = None):
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
        # params (given: name -> host array, e.g. from a checkpoint; the dict is emptied) are
        # converted one by one, each dropped once converted: two copies of the weights never coexist
        if params is None:
            params = init_params(config, seed)
        elif {k: tuple(v.shape) for k, v in params.items()} != param_shapes(config):
            raise ValueError("params must hold exactly the names and shapes of param_shapes(config)")
        self.params = {k: backend.to_device(params.pop(k), self.xp, self.dtype) for k in param_shapes(config)}
        self.grads: dict = {}
        # State that is not trained by the optimizer (e.g. DeepSeek-V3's selection bias).
        self.buffers = {
            k: backend.to_device(v, self.xp, self.dtype) for k, v in moe.init_buffers(config).items()
        }
        self.training = True
        self.rng = backend.make_rng(seed + 1, self.xp)  # dropout masks and router noise
        if config.pos_emb == "rope":
            self._rope = rope_tables(
                config.block_size, config.rope_dim, config.rope_theta, xp=self.xp, dtype=self.dtype
            )
        self._cache = None
        self.stats: dict = {}
        # P ranks (a layers.exchange.Group set by minimoe.dist; None in one process): forward() then
        # takes the GLOBAL batch, computes this rank's rows, and returns the global batch's loss
        self.group, self._lm_share = None, 1.0  # _lm_share: this rank's counted tokens / all ranks'

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
        kv_cache: a `layers.attention.make_kv_cache(...)` cache for generation (KVCache, or MLA's
            LatentKVCache); its positions advance by T.
        """
        c, p, xp = self.config, self.params, self.xp
        self._check_idx(idx)  # on the host when idx comes from the host (no device sync)
        if self.group is not None:  # this rank's share of the global batch (minimoe.dist)
            idx = self.group.local_rows(idx)
            targets = None if targets is None else self.group.local_rows(targets)
        if not backend.is_cupy_array(idx) and xp is not numpy:
            idx = xp.asarray(idx)  # the batch moves to the device once
        B, T = idx.shape
        pos0 = kv_cache.pos if kv_cache is not None else 0
        if pos0 + T > c.block_size:
            raise ValueError(f"sequence length {pos0 + T} exceeds block_size = {c.block_size}")
        train = self.training and kv_cache is None
        caches, self._cache = StepCaches(previous=self._cache), None

        x, caches["wte"] = embedding.embedding_forward(idx, p["wte"])
        x = _scale(x, c.embedding_multiplier)
        if c.pos_emb == "learned":
            x = x + p["wpe"][pos0 : pos0 + T]
        x, caches["drop_emb"] = dropout.dropout_forward(x, c.dropout, self.rng, train)
        rope = None
        if c.pos_emb == "rope":
            rope = (self._rope[0][pos0 : pos0 + T], self._rope[1][pos0 : pos0 + T])

        self.stats = {"layers": []}  # the MoE layers append their routing statistics
        for i in range(c.n_layer):
            pre = f"blocks.{i}."
            # x = x + Dropout(Attention(Norm1(x)))
            h, caches[pre + "ln1"] = self._norm_forward(x, pre + "ln1")
            a, caches[pre + "attn"] = self._attention_forward(i, h, rope, kv_cache)
            a, caches[pre + "drop1"] = dropout.dropout_forward(a, c.dropout, self.rng, train)
            x = x + _scale(a, c.residual_multiplier)
            # x = x + Dropout(MLP(Norm2(x)))
            h, caches[pre + "ln2"] = self._norm_forward(x, pre + "ln2")
            m, caches[pre + "mlp"] = self._mlp_forward(i, h, train)
            m, caches[pre + "drop2"] = dropout.dropout_forward(m, c.dropout, self.rng, train)
            x = x + _scale(m, c.residual_multiplier)
        x, caches["ln_f"] = self._norm_forward(x, "ln_f")
        head = p["wte"].T if c.tie_embeddings else p["lm_head"]
        logits, caches["head"] = linear.linear_forward(x, head)
        logits = _scale(logits, 1.0 / c.logits_scaling)

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
        if self.group is not None:  # the mean over every rank's counted tokens
            lm_loss, self._lm_share = exchange.global_mean(lm_loss, caches["loss"].valid.sum(), self.group)
        total = lm_loss
        if c.n_experts > 0:
            aux_total = sum((st["aux_loss"] for st in self.stats["layers"]), 0.0)
            z_total = sum((st["z_loss"] for st in self.stats["layers"]), 0.0)
            total = lm_loss + c.aux_loss_coef * aux_total + c.z_loss_coef * z_total
            self.stats.update(aux_loss=aux_total, z_loss=z_total)
        self.stats["lm_loss"] = lm_loss
        self._cache = caches.done()
        return logits, total

    # ------------------------------------------------------------------ the pieces of a block
    # Each forward returns (y, cache); its backward takes that cache and writes the piece's
    # parameter gradients into self.grads.
    def _attention_forward(self, i, h, rope, kv_cache):
        """Attention(h) of block i: (B, T, C) -> (B, T, C), cache."""
        c, p, pre = self.config, self.params, f"blocks.{i}.attn."
        kv = None if kv_cache is None else (kv_cache, i)
        if c.attention == "mla":
            return mla.mla_block_forward(c, h, p, pre, rope, kv)
        w = p[pre + "wqkv"], p.get(pre + "bqkv"), p[pre + "wo"], p.get(pre + "bo")
        qk = None
        if c.qk_norm != "none":
            qk = attention.QKNorm(c.qk_norm == "head", p[pre + "q_norm.w"], p[pre + "k_norm.w"], c.norm_eps)
        # Granite's attention_multiplier m replaces 1/sqrt(D): scores q k^T m = (q m sqrt(D)) k^T / sqrt(D)
        m = c.attention_multiplier
        q_scale = 1.0 if m is None else m * math.sqrt(c.head_size)
        return attention.self_attention_forward(h, *w, c.n_head, c.n_kv_head, rope, kv, qk, q_scale)

    def _attention_backward(self, i, da, cache):
        """Backward of `_attention_forward`: -> dh; the block's attention gradients go to self.grads."""
        pre, g = f"blocks.{i}.attn.", self.grads
        if self.config.attention == "mla":
            return mla.mla_block_backward(da, cache, pre, g)
        dh, g[pre + "wqkv"], dbqkv, g[pre + "wo"], dbo, *dqk = attention.self_attention_backward(da, cache)
        if dbqkv is not None:
            g[pre + "bqkv"] = dbqkv
        if dbo is not None:
            g[pre + "bo"] = dbo
        if dqk:
            g[pre + "q_norm.w"], g[pre + "k_norm.w"] = dqk
        return dh

    def _mlp_forward(self, i, h, train):
        """MLP(h) of block i: the dense FFN, or the MoE layer (its routing statistics go to
        self.stats["layers"]). (B, T, C) -> (B, T, C), cache."""
        c, pre = self.config, f"blocks.{i}."
        if not c.is_moe_block(i):
            return ffn.ffn_forward(c, h, self.params, pre + "mlp.")
        m, cache, st = moe.moe_forward(
            c, h, self.params, self.buffers, pre + "moe.", self.rng, train, self.group
        )
        st["layer"] = i
        self.stats["layers"].append(st)
        return m, cache

    def _mlp_backward(self, i, dm, cache):
        """Backward of `_mlp_forward`: -> dh; the block's MLP gradients go to self.grads."""
        c, pre = self.config, f"blocks.{i}."
        if c.is_moe_block(i):
            return moe.moe_backward(c, dm, cache, pre + "moe.", self.grads)
        return ffn.ffn_backward(c, dm, cache, pre + "mlp.", self.grads)

    def _norm_forward(self, x, name):
        """Norm(x) with the weights under `name`: LayerNorm or RMSNorm. (..., C) -> (..., C), cache."""
        p = self.params
        if self.config.norm == "layernorm":
            return norm.layernorm_forward(x, p[name + ".w"], p[name + ".b"], self.config.norm_eps)
        return norm.rmsnorm_forward(x, p[name + ".w"], self.config.norm_eps)

    def _norm_backward(self, dy, cache, name):
        """Backward of `_norm_forward`: -> dx; the norm's gradients go to self.grads."""
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
        g = self.grads = {}  # filled by the helpers below, then put in the order of self.params

        dlogits = _scale(loss.cross_entropy_backward(self._lm_share, caches["loss"]), 1.0 / c.logits_scaling)
        dx, dhead, _ = linear.linear_backward(dlogits, caches["head"])
        if c.tie_embeddings:
            dwte_head = dhead.T  # the head is wte^T: its gradient joins the embedding's below
        else:
            g["lm_head"] = dhead
        dx = self._norm_backward(dx, caches["ln_f"], "ln_f")

        for i in reversed(range(c.n_layer)):
            pre = f"blocks.{i}."
            # x = x + Dropout(MLP(Norm2(x)))
            dm = dropout.dropout_backward(_scale(dx, c.residual_multiplier), caches[pre + "drop2"])
            dh = self._mlp_backward(i, dm, caches[pre + "mlp"])
            dx = dx + self._norm_backward(dh, caches[pre + "ln2"], pre + "ln2")
            # x = x + Dropout(Attention(Norm1(x)))
            da = dropout.dropout_backward(_scale(dx, c.residual_multiplier), caches[pre + "drop1"])
            dh = self._attention_backward(i, da, caches[pre + "attn"])
            dx = dx + self._norm_backward(dh, caches[pre + "ln1"], pre + "ln1")

        dx = dropout.dropout_backward(dx, caches["drop_emb"])
        if c.pos_emb == "learned":
            T = dx.shape[1]
            dwpe = self.xp.zeros_like(p["wpe"])
            dwpe[:T] = dx.sum(axis=0)
            g["wpe"] = dwpe
        g["wte"] = embedding.embedding_backward(_scale(dx, c.embedding_multiplier), caches["wte"])
        if c.tie_embeddings:
            g["wte"] += dwte_head
        # keep the order of model.params (optimizers and checkpoints walk it)
        self.grads = {k: g[k] for k in p}
        return self.grads

    # ------------------------------------------------------------------ MoE upkeep
    def update_router_biases(self):
        """DeepSeek-V3 auxiliary-loss-free balancing: after an optimizer step, nudge each MoE
        layer's selection bias towards balance (not a gradient step; see layers/moe.update_bias)."""
        for st in self.stats.get("layers", []):
            moe.update_bias(self.config, self.buffers, f"blocks.{st['layer']}.moe.", st)
