"""The training loop: data -> tokenizer -> model -> AdamW steps, with evaluation, metrics,
checkpoints and resumption.

    from minimoe.train import train
    summary = train(preset="mixtral", data="synthetic", max_iters=200, out="out/run1")

One step (B batch, T block size):
    lr   = cosine_lr(it, ...)                      linear warmup, then a half cosine to min_lr
    x, y = get_batch(train_ids, B, T, rng)         (B, T) int64 each, built on the host ...
    x, y -> device                                 ... and moved once per step
    loss = model.forward(x, y); model.backward()   LM loss + the MoE balancing terms
    clip_grad_norm(grads, grad_clip)               global L2 norm <= grad_clip
    AdamW step; model.update_router_biases()       (DeepSeek-V3 selection bias, if any)
The LM losses stay on the device as 0-d arrays and are copied to the host once per log
interval (on a GPU every copy is a synchronisation). Every `eval_interval` steps and at the end
the model is evaluated on the held-out split (the last 10% of the text) and OUT/ckpt.npz is
written. Ctrl-C finishes the current step, saves a checkpoint and stops.

Resuming (`resume=True`) restores parameters, AdamW moments and step count, the DeepSeek bias
buffers, and the random generators of data sampling and of the model (dropout, router noise),
so on the CPU a resumed run reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minimoe import backend, checkpoint, data
from minimoe.model import GPT
from minimoe.optim import AdamW, clip_grad_norm, cosine_lr
from minimoe.presets import PRESETS, count_params, get_preset
from minimoe.tokenizer import BPETokenizer, CharTokenizer

VAL_FRACTION = 0.1


@dataclass
class TrainOptions:
    """Every option of `minimoe train` (the CLI flags are these names with dashes)."""

    preset: str = "mixtral"
    data: str = "builtin"  # builtin | synthetic | tinyshakespeare | a path to a UTF-8 text file
    tokenizer: str = "char"  # char | bpe
    vocab_size: int = 512  # BPE only: 256 byte tokens + (vocab_size - 256) merges
    out: str = "out"
    max_iters: int = 1500
    batch_size: int = 12
    block_size: Optional[int] = None  # None: the preset's
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    n_experts: Optional[int] = None
    top_k: Optional[int] = None
    dropout: Optional[float] = None
    lr: float = 1e-3
    min_lr: Optional[float] = None  # None: lr / 10
    warmup_iters: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: no clipping
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 0
    device: str = "cpu"  # cpu | gpu (CuPy)
    dtype: str = "float32"
    resume: bool = False
    sample_tokens: int = 200  # printed at the end; 0: none


# A checkpoint's model is fixed: these may not change when resuming.
LOCKED_ON_RESUME = (
    "preset",
    "tokenizer",
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "n_experts",
    "top_k",
    "dropout",
    "dtype",
)
MODEL_OVERRIDES = ("block_size", "n_layer", "n_head", "n_embd", "n_experts", "top_k", "dropout")
_DEFAULTS = TrainOptions()


def _given(options) -> dict:
    """The options a caller set: non-None entries of a dict / Namespace, or the fields of a
    TrainOptions that differ from the defaults."""
    if options is None:
        return {}
    if isinstance(options, TrainOptions):
        return {k: v for k, v in dataclasses.asdict(options).items() if v != getattr(_DEFAULTS, k)}
    d = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(d) - fields - {"command", "func", "quiet"})
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; valid options are {sorted(fields)}")
    return {k: v for k, v in d.items() if k in fields and v is not None}


def check_options(o: TrainOptions):
    """ValueError naming the first bad option (as its CLI flag) and what would be valid."""

    def need(cond, name, valid):
        if not cond:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} = {getattr(o, name)!r} is invalid: {valid}")

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    toys = ", ".join(k for k, v in PRESETS.items() if not v.get("counted_only"))
    need(o.preset in PRESETS, "preset", f"valid presets are {toys}")
    need(
        not PRESETS[o.preset].get("counted_only"),
        "preset",
        f"it is a published full-size configuration, kept for counting only; train one of {toys}",
    )
    need(o.tokenizer in ("char", "bpe"), "tokenizer", "use 'char' or 'bpe'")
    need(o.device in ("cpu", "gpu"), "device", "use 'cpu' or 'gpu'")
    need(o.dtype in ("float32", "float64"), "dtype", "use 'float32' or 'float64'")
    need(is_int(o.vocab_size) and o.vocab_size >= 256, "vocab_size", "BPE needs an integer >= 256")
    for name in ("max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval"):
        need(is_int(getattr(o, name)) and getattr(o, name) >= 1, name, "it must be an integer >= 1")
    for name in ("block_size", "n_layer", "n_head", "n_embd"):
        v = getattr(o, name)
        need(v is None or (is_int(v) and v >= 1), name, "it must be an integer >= 1")
    need(
        o.n_experts is None or (is_int(o.n_experts) and o.n_experts >= 0),
        "n_experts",
        "it must be an integer >= 0 (0: a dense model)",
    )
    need(o.top_k is None or (is_int(o.top_k) and o.top_k >= 1), "top_k", "it must be an integer >= 1")
    need(o.dropout is None or 0 <= o.dropout < 1, "dropout", "it must be in [0, 1)")
    need(is_int(o.warmup_iters) and o.warmup_iters >= 0, "warmup_iters", "it must be an integer >= 0")
    need(is_int(o.sample_tokens) and o.sample_tokens >= 0, "sample_tokens", "it must be an integer >= 0")
    need(is_int(o.seed) and o.seed >= 0, "seed", "it must be an integer >= 0")
    need(o.lr > 0 and math.isfinite(o.lr), "lr", "it must be a number > 0")
    need(o.min_lr is None or 0 <= o.min_lr <= o.lr, "min_lr", f"it must be in [0, lr = {o.lr}]")
    need(o.weight_decay >= 0, "weight_decay", "it must be >= 0")
    need(o.grad_clip >= 0, "grad_clip", "it must be >= 0 (0: no clipping)")


def build_config(o: TrainOptions, vocab_size: int):
    """The preset's Config with the command-line overrides and the tokenizer's vocabulary."""
    overrides = {k: getattr(o, k) for k in MODEL_OVERRIDES if getattr(o, k) is not None}
    return get_preset(o.preset, vocab_size=vocab_size, **overrides)


def load_data(o: TrainOptions, tokenizer=None):
    """(tokenizer, train_ids, val_ids): the corpus, tokenized (a new tokenizer unless given)."""
    text = data.load_corpus(o.data)
    if tokenizer is None:
        if o.tokenizer == "char":
            tokenizer = CharTokenizer.from_text(text)
        else:
            tokenizer = BPETokenizer.train(text, o.vocab_size)
    try:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    except ValueError as e:
        raise data.DataError(
            f"the data {o.data!r} cannot be encoded with the checkpoint's tokenizer ({e})"
        ) from None
    return tokenizer, ids


def split_data(ids, block_size: int, source: str):
    """Train/validation split; both parts must hold one window of block_size + 1 tokens."""
    n, need = len(ids), block_size + 1
    n_val = int(round(n * VAL_FRACTION))
    if n - n_val < need or n_val < need:
        raise data.DataError(
            f"the data {source!r} has {n} tokens, too few for --block-size {block_size}: its training and "
            f"validation parts ({1 - VAL_FRACTION:.0%} / {VAL_FRACTION:.0%}) each need at least {need} "
            f"tokens (about {math.ceil(need / VAL_FRACTION)} in all); use more text or a smaller --block-size"
        )
    return data.train_val_split(ids, VAL_FRACTION, min_len=need)


def train_step(model, optimizer, xb, yb, lr: float, grad_clip: float):
    """One optimizer step on host batch (xb, yb) (B, T); returns the LM loss as a 0-d device array
    (reading it would force a host/device synchronisation, so the caller decides when)."""
    model.forward(xb, yb)  # checks the ids on the host, then moves the batch to the device once
    model.backward()
    if grad_clip > 0:
        clip_grad_norm(model.grads, grad_clip)  # global L2 norm of all gradients <= grad_clip
    optimizer.step(model.grads, lr=lr)
    model.update_router_biases()  # DeepSeek-V3 selection bias; no-op for other routers
    return model.stats["lm_loss"]


def loss_summary(model, pending: list) -> dict:
    """The last and the mean of the LM losses kept on the device since the last log: one copy."""
    losses = backend.to_numpy(model.xp.stack(pending)).astype(np.float64)
    return {"train_loss": float(losses[-1]), "train_loss_avg": float(losses.mean())}


def unigram_loss(ids, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the best context-free model: the entropy of token frequencies."""
    counts = np.bincount(np.asarray(ids), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def estimate_loss(model, ids, batch_size: int, block_size: int, eval_iters: int, seed: int) -> float:
    """Mean LM loss over `eval_iters` batches, in eval mode (no dropout, no router noise).

    The batches come from a generator of their own, seeded identically at every evaluation:
    every evaluation scores the same windows, and the training data stream is not disturbed.
    """
    rng = np.random.default_rng((seed, 1))
    was_training = model.training
    model.eval()
    losses = []
    try:
        for _ in range(eval_iters):
            x, y = data.get_batch(ids, batch_size, block_size, rng)
            model.forward(x, y)  # host batch: checked on the host, moved once
            losses.append(model.stats["lm_loss"])
    finally:
        if was_training:
            model.train()
    return float(backend.to_numpy(model.xp.stack(losses)).mean())  # one copy to the host


def moe_stats(model) -> list:
    """Per MoE layer: expert load (fractions of assignments), dropped fraction, losses, entropy."""
    out = []
    for st in model.stats.get("layers", []):
        counts = backend.to_numpy(st["tokens_per_expert"]).astype(np.float64)
        out.append(
            {
                "layer": int(st["layer"]),
                "load": [round(float(f), 6) for f in counts / max(counts.sum(), 1.0)],
                "dropped_fraction": float(backend.to_numpy(st["dropped_fraction"])),
                "aux_loss": float(backend.to_numpy(st["aux_loss"])),
                "z_loss": float(backend.to_numpy(st["z_loss"])),
                "router_entropy": float(backend.to_numpy(st["router_entropy"])),
            }
        )
    return out


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A progress display: tqdm when installed; else one line rewritten with \\r on a terminal,
    or one printed line per log interval when stdout is not a terminal (a log file)."""

    def __init__(self, total: int, initial: int, stream=None, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.total, self.start = total, initial
        self.t0 = time.time()
        self.last_draw = 0.0
        self.status = ""
        self.bar = None
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        if self.tty:  # a bar only on a terminal: in a log file its redraws would be noise
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, file=self.stream, unit="it", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def eta(self, it: int) -> float:
        done = it - self.start
        return (time.time() - self.t0) / done * (self.total - it) if done > 0 else float("nan")

    def update(self, it: int):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        elif self.tty and time.time() - self.last_draw > 0.1:
            self.last_draw = time.time()
            line = " | ".join(
                s for s in (f"step {it}/{self.total}", self.status, f"ETA {_fmt_time(self.eta(it))}") if s
            )
            self.stream.write("\r" + line.ljust(79))
            self.stream.flush()

    def log(self, rec: dict):
        if not self.enabled:
            return
        self.status = f"loss {rec['train_loss_avg']:.4f} | {rec['tokens_per_s'] / 1000:.1f}k tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {rec['train_loss_avg']:.4f}, {rec['tokens_per_s'] / 1000:.1f}k tok/s"
            )
        elif not self.tty:
            it = rec["step"]
            self.write(f"step {it}/{self.total} | {self.status} | ETA {_fmt_time(self.eta(it))}")

    def write(self, line: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(("\r" + " " * 79 + "\r" if self.tty else "") + line + "\n")
            self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _DeferSigint:
    """Turn the first Ctrl-C into a flag checked between steps (so a checkpoint is never taken
    from a half-done optimizer update); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _resolve_options(options, overrides) -> tuple[TrainOptions, dict]:
    given = _given(options)
    given.update(_given(overrides))
    o = TrainOptions(**given)
    return o, given


def _apply_resume(o: TrainOptions, given: dict, ckpt) -> TrainOptions:
    """The checkpoint's options, with the options given now for everything but the model."""
    saved = {
        k: v
        for k, v in ckpt.train_state.get("options", {}).items()
        if k in {f.name for f in dataclasses.fields(TrainOptions)}
    }
    for k in LOCKED_ON_RESUME:
        if k in given and k in saved and given[k] != saved[k]:
            flag = "--" + k.replace("_", "-")
            raise ValueError(
                f"{flag} {given[k]!r} differs from the checkpoint's {saved[k]!r}; a resumed run keeps its "
                f"model, so drop {flag} or start a new run in another --out directory"
            )
    merged = dict(saved, **{k: v for k, v in given.items() if k not in LOCKED_ON_RESUME})
    merged["resume"] = True
    return TrainOptions(**merged)


def train(options=None, *, callback=None, quiet: bool = False, stream=None, **overrides) -> dict:
    """Train a model; returns a summary dict (iterations, losses, timings, paths, sample).

    options: a TrainOptions, an argparse.Namespace or a dict (None entries mean "default");
    keyword overrides are applied on top. callback(it, model) runs after every step (a test
    hook; raising KeyboardInterrupt there behaves like Ctrl-C). quiet: print nothing.
    Raises data.DataError / ValueError / checkpoint.CheckpointError / backend.BackendError for
    bad inputs; a Ctrl-C returns normally with summary["interrupted"] = True.
    """
    o, given = _resolve_options(options, overrides)
    out = Path(o.out)
    ckpt = None
    if o.resume:
        if not checkpoint.checkpoint_path(out).is_file():
            raise checkpoint.CheckpointError(
                f"--resume: there is no checkpoint {str(checkpoint.checkpoint_path(out))!r} to resume from; "
                "train without --resume first, or point --out at the run's directory"
            )
        ckpt = checkpoint.load_checkpoint(out)
        o = _apply_resume(o, given, ckpt)
    check_options(o)
    stream = stream or sys.stdout
    say = (lambda *a: None) if quiet else (lambda line: print(line, file=stream, flush=True))

    backend.set_backend("cupy" if o.device == "gpu" else "numpy")
    tokenizer = checkpoint.load_tokenizer(ckpt) if ckpt is not None else None
    if tokenizer is None:
        # validate the model options before the (possibly slow) corpus and tokenizer work
        build_config(o, vocab_size=256)
    tokenizer, ids = load_data(o, tokenizer)
    if ckpt is not None:
        model = checkpoint.build_model(ckpt, o.dtype)
        config = model.config
    else:
        config = build_config(o, tokenizer.vocab_size)
        model = GPT(config, seed=o.seed, dtype=o.dtype)
    B, T = o.batch_size, config.block_size
    train_ids, val_ids = split_data(ids, T, o.data)

    optimizer = AdamW(model.params, lr=o.lr, weight_decay=o.weight_decay)
    data_rng = np.random.default_rng(o.seed)
    state = {
        "iteration": 0,
        "best_val_loss": None,
        "last_val_loss": None,
        "last_train_loss": None,
        "elapsed_s": 0.0,
    }
    if ckpt is not None:
        checkpoint.load_optimizer_state(ckpt, optimizer, model)
        checkpoint.set_rng_state(data_rng, ckpt.rng.get("data"))
        if not checkpoint.set_rng_state(model.rng, ckpt.rng.get("model")):
            model.rng = backend.make_rng(o.seed + 1 + int(ckpt.train_state.get("iteration", 0)), model.xp)
        state.update({k: ckpt.train_state[k] for k in state if k in ckpt.train_state})

    start = it = int(state["iteration"])
    counts = count_params(config)
    unigram = unigram_loss(train_ids, config.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    _prepare_metrics(metrics_path, start)

    def save():
        state["iteration"] = it
        state["tokens_seen"] = it * B * T
        ts = dict(
            state, seed=o.seed, options=dataclasses.asdict(o), backend=backend.get_backend(), params=counts
        )
        return checkpoint.save_checkpoint(
            out, model, optimizer, tokenizer, ts, rngs={"data": data_rng, "model": model.rng}
        )

    kind = f"MoE {config.n_experts} experts top-{config.top_k}" if config.n_experts else "dense"
    say(
        f"{'resuming' if ckpt else 'training'} {o.preset} ({kind}, {config.n_layer} layers, "
        f"{config.n_embd} wide, "
        f"{counts['total']:,} params, {counts['active']:,} active) on {o.data!r}: {len(train_ids):,} train / "
        f"{len(val_ids):,} val {o.tokenizer} tokens, vocab {config.vocab_size}; unigram loss {unigram:.3f}"
    )
    if it >= o.max_iters:
        say(
            f"the checkpoint is already at step {it} >= --max-iters {o.max_iters}; raise --max-iters to go on"
        )

    t_run = time.time()
    elapsed0 = float(state["elapsed_s"])
    t_log, it_log = time.time(), it
    pending = []  # LM losses (0-d device arrays) since the last log
    progress = Progress(o.max_iters, it, stream, enabled=not quiet)
    interrupted = in_step = False
    saved_at = start if ckpt is not None else None
    try:
        with _DeferSigint() as sigint, open(metrics_path, "a", encoding="utf-8") as mfile:
            while it < o.max_iters:
                lr = cosine_lr(it, o.lr, o.warmup_iters, o.max_iters, o.min_lr)
                xb, yb = data.get_batch(train_ids, B, T, data_rng)
                in_step = True
                pending.append(train_step(model, optimizer, xb, yb, lr, o.grad_clip))
                it += 1
                in_step = False

                evaluate = it % o.eval_interval == 0 or it == o.max_iters
                if it % o.log_interval == 0 or evaluate:
                    now = time.time()
                    rec = {"step": it, **loss_summary(model, pending), "lr": lr,
                           "tokens_per_s": (it - it_log) * B * T / max(now - t_log, 1e-9),
                           "elapsed_s": elapsed0 + now - t_run, "tokens": it * B * T}  # fmt: skip
                    if config.n_experts:
                        rec["moe"] = moe_stats(model)
                    pending = []
                    state["last_train_loss"] = rec["train_loss_avg"]
                    if evaluate:
                        val = estimate_loss(model, val_ids, B, T, o.eval_iters, o.seed)
                        rec["val_loss"] = val
                        best = state["best_val_loss"]
                        state["best_val_loss"] = val if best is None else min(best, val)
                        state["last_val_loss"] = val
                    mfile.write(json.dumps(rec) + "\n")
                    mfile.flush()
                    progress.log(rec)
                    if evaluate:
                        state["elapsed_s"] = elapsed0 + time.time() - t_run
                        path = save()
                        saved_at = it
                        progress.write(
                            f"step {it}: train loss {rec['train_loss_avg']:.4f}, val loss {val:.4f}; "
                            f"saved {path}"
                        )
                    t_log, it_log = time.time(), it
                progress.update(it)
                if callback is not None:
                    callback(it, model)
                if sigint.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        model.train()
        progress.close()
        if in_step:  # only a second Ctrl-C lands inside a step: the weights are half updated
            kept = (
                "no checkpoint was saved" if saved_at is None else f"the step-{saved_at} checkpoint is kept"
            )
            say(f"interrupted in the middle of step {it + 1}; {kept}")
        elif saved_at != it:
            state["elapsed_s"] = elapsed0 + time.time() - t_run
            path = save()
            say(f"interrupted at step {it}: checkpoint saved to {path}; continue with --resume --out {out}")
        else:
            say(f"interrupted at step {it}: checkpoint {checkpoint.checkpoint_path(out)} is up to date")
    else:
        progress.close()

    summary = {
        "iterations": it,
        "max_iters": o.max_iters,
        "train_loss": state["last_train_loss"],
        "val_loss": state["last_val_loss"],
        "best_val_loss": state["best_val_loss"],
        "unigram_loss": unigram,
        "tokens_seen": it * B * T,
        "elapsed_s": elapsed0 + time.time() - t_run,
        "session_s": time.time() - t_run,
        "session_iters": it - start,
        "out": str(out),
        "checkpoint": str(checkpoint.checkpoint_path(out)),
        "metrics": str(metrics_path),
        "params": counts,
        "interrupted": interrupted,
        "sample": None,
    }
    if interrupted:
        return summary
    if it > start:
        say(
            f"done: {it} steps in {_fmt_time(summary['session_s'])}; train loss {summary['train_loss']:.4f}, "
            f"val loss {summary['val_loss']:.4f} (unigram {unigram:.4f})"
        )
    if o.sample_tokens:
        from minimoe.sample import sample_text

        say("--- sample ---")
        summary["sample"] = sample_text(
            model,
            tokenizer,
            "",
            o.sample_tokens,
            temperature=0.8,
            seed=o.seed,
            stream=None if quiet else stream,
        )
        say("")
    return summary


def _prepare_metrics(path: Path, start: int):
    """A fresh run starts an empty metrics file; a resumed one drops records after its checkpoint
    (steps that were logged but not saved before an interruption, and are now redone)."""
    if start == 0 or not path.exists():
        path.write_text("", encoding="utf-8")
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= start:
                keep.append(line)
        except ValueError:
            continue
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
