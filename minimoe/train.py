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
written. Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops.

What keeps a user's work safe is in docs/guarantees.md: one run per directory (minimoe.rundir),
non-finite steps skipped and a diverged run stopped unsaved (minimoe.guards), metrics.jsonl kept
consistent with ckpt.npz and no temporary file left behind (minimoe.rundir).

Resuming (`resume=True`) restores parameters, AdamW moments and step count, the DeepSeek bias
buffers, and the random generators of data sampling and of the model (dropout, router noise),
so on the CPU a resumed run reproduces the uninterrupted run's losses bit for bit, and its
reported averages too (the losses since the last metrics record travel in the checkpoint).
Under an MPI launcher (`mpiexec -n P python -m minimoe train ...`) P ranks train the model the
one-process run trains, data- or expert-parallel: see minimoe.dist. Rank 0 holds the run lock,
writes the metrics and checkpoints; every decision (stop, skip a step, diverged) is the same on
every rank, since the ranks see the same global losses and gradient norms.
Fine-tuning (`init_from` a base checkpoint, dialogue data such as `data="chat-builtin"`, the loss
on the assistant's tokens only): minimoe.finetune and minimoe.chat_data.
Around the loop: minimoe.options (the options, their defaults and validation, resume merging),
minimoe.metrics (what is measured and logged), minimoe.progress (the display) and
minimoe.signals (the deferred Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minimoe import backend, chat_data, checkpoint, data, dist, finetune, guards
from minimoe.guards import Diverged, DivergenceGuard
from minimoe.metrics import MetricsLog, estimate_loss, loss_summary, moe_stats, unigram_loss
from minimoe.model import GPT
from minimoe.optim import AdamW, clip_grad_norm, cosine_lr
from minimoe.options import (
    DEFAULTS,
    TrainOptions,
    check_options,
    given_options,
    model_config,
    resolve_options,
)
from minimoe.presets import count_params
from minimoe.progress import Progress, format_duration
from minimoe.rundir import RunLock, after_save, open_metrics
from minimoe.sample import sample_text
from minimoe.signals import StopRequest
from minimoe.tokenizer import BPETokenizer, CharTokenizer

VAL_FRACTION = 0.1


def train(options=None, *, callback=None, quiet: bool = False, stream=None, **overrides) -> dict:
    """Train a model; returns a summary dict (iterations, losses, timings, paths, sample).

    options: a TrainOptions, an argparse.Namespace or a dict (None entries mean "not given");
    keyword overrides are applied on top; a value given always wins over the default and, when
    resuming, over the checkpoint's. callback(it, model) runs after every step (a test hook;
    raising KeyboardInterrupt there behaves like Ctrl-C). quiet: print nothing.
    Raises a minimoe.errors.UserError (OptionError, DataError, CheckpointError, BackendError,
    RunLockError) for bad inputs; a Ctrl-C or SIGTERM returns normally with summary["interrupted"]
    = True (summary["signal"] the signal's number), a divergence with summary["diverged"] = True.
    """
    w, lock = dist.world(), None  # w: None in one process
    try:
        with dist.together(w):  # a set-up error on any rank stops every rank
            o, ckpt = prepare(options, overrides)
            backend.set_backend("cupy" if o.device == "gpu" else "numpy")
            if w is None or w.root:  # one run per directory, until this run ends (rank 0's for all)
                lock = RunLock(o.out).acquire()
            run = Run.start(o, ckpt, w)
        quiet = quiet or (w is not None and not w.root)  # rank 0 alone prints
        say = (
            (lambda line: None)
            if quiet
            else (lambda line: print(line, file=stream or sys.stdout, flush=True))
        )
        return _train(run, ckpt, lock and lock.note, say, stream or sys.stdout, callback, quiet)
    finally:
        if lock is not None:
            lock.release()


def _train(run, ckpt, note, say, stream, callback, quiet) -> dict:
    """train()'s body, while this process (rank 0 for all ranks) owns the run directory."""
    o, w = run.o, run.world
    if note:
        say(note)
    say(run.describe(resuming=ckpt is not None))
    if run.step >= o.max_iters:
        say(f"the checkpoint is already at step {run.step} >= --max-iters {o.max_iters}; raise it to go on")

    B, T = o.batch_size, run.model.config.block_size
    progress = Progress(o.max_iters, run.step, stream, enabled=not quiet)
    t_log, it_log = time.time(), run.step
    in_step = False
    # NaN/inf are reported by the run's guard in one line each: numpy's warnings would repeat them
    quiet_fp = np.errstate(over="ignore", invalid="ignore", divide="ignore")
    with StopRequest() as stop, run.open_metrics() as metrics, quiet_fp, \
            dist.guard(w, agreed=(KeyboardInterrupt, Diverged)), dist.Watchdog(w) as watchdog:  # fmt: skip
        if run.cleaned:
            say(run.cleaned)
        try:
            while run.step < o.max_iters:
                lr = cosine_lr(run.step, o.lr, o.warmup_iters, o.max_iters, o.min_lr)
                xb, yb = data.get_batch(run.train_ids, B, T, run.data_rng)  # the global batch
                in_step = True
                loss = train_step(run.model, run.optimizer, xb, yb, lr, o.grad_clip, run.guard, w)
                run.step += 1
                in_step = False
                if loss is None:  # not applied: the loss or gradient norm was not finite
                    progress.write(run.guard.skipped_line(run.step))  # raises Diverged at the limit
                else:
                    run.pending.append(loss)

                evaluate = run.step % o.eval_interval == 0 or run.step == o.max_iters
                if run.step % o.log_interval == 0 or evaluate:
                    seconds = max(time.time() - t_log, 1e-9)
                    rec = run.record(lr, tokens_per_s=(run.step - it_log) * B * T / seconds)
                    if evaluate:
                        rec["val_loss"] = run.evaluate()
                    metrics.write(rec)
                    if rec["train_loss_avg"] is not None:  # None: every step since the last was skipped
                        progress.log(rec)
                    warning = run.guard.loss_warning(rec)
                    if warning:
                        progress.write(warning)
                    if evaluate:
                        progress.write(run.checkpoint_line(rec["val_loss"]))  # saves, unless unsound
                    t_log, it_log = time.time(), run.step
                progress.update(run.step)
                if callback is not None:
                    callback(run.step, run.model)
                watchdog.beat()
                if stop.requested if w is None else w.any(stop.requested):  # all ranks stop together
                    run.signal = stop.received
                    raise KeyboardInterrupt
        except (KeyboardInterrupt, Diverged) as e:
            if w is not None and in_step:  # on this rank alone, mid-step: the others cannot follow
                w.abort(e)
            progress.close()
            run.model.train()  # an interrupted evaluation may have left it in eval mode
            diverged = isinstance(e, Diverged)
            say(run.diverged(e) if diverged else run.stop(in_step))
            return run.summary(interrupted=not diverged, diverged=diverged)
    progress.close()

    summary = run.summary(interrupted=False)
    if run.step > run.start_step:
        say(f"done: {run.step} steps in {format_duration(summary['session_s'])}; train loss "
            f"{summary['train_loss']:.4f}, val loss {summary['val_loss']:.4f} (unigram {run.unigram:.4f})")  # fmt: skip
    model = run.model if w is None else w.standalone_model(run.model, o.seed) if o.sample_tokens else None
    if o.sample_tokens and model is not None:  # on rank 0 alone, from the whole model
        say("--- sample ---")
        summary["sample"] = sample_text(model, run.tokenizer, "", o.sample_tokens, temperature=0.8,
                                        seed=o.seed, stream=None if quiet else stream)  # fmt: skip
        say("")
    return summary


def prepare(options=None, overrides=None) -> tuple[TrainOptions, Optional[checkpoint.Checkpoint]]:
    """The validated options, and the checkpoint to resume from (None for a new run)."""
    given = given_options(options)
    given.update(given_options(overrides))
    ckpt = None
    if given.get("resume"):
        given["out"] = out = given.get("out", DEFAULTS.out)  # the run's directory is where it is now
        if not checkpoint.checkpoint_path(out).is_file():
            raise checkpoint.CheckpointError(
                f"--resume: there is no checkpoint {str(checkpoint.checkpoint_path(out))!r} to resume from; "
                "train without --resume first, or point --out at the run's directory"
            )
        ckpt = checkpoint.load_checkpoint(out)
        checkpoint.check_resumable(ckpt)
    elif given.get("init_from"):
        given = finetune.init_from_options(given)  # the base's model options; --out must differ
    o = resolve_options(given, saved=None if ckpt is None else ckpt.train_state.get("options", {}))
    check_options(o)
    config = ckpt.config if ckpt else model_config(o, o.vocab_size if o.tokenizer == "bpe" else 256)
    guards.check_training_memory(config, o.batch_size, o.dtype)  # before anything is built
    return o, ckpt


def train_step(model, optimizer, xb, yb, lr: float, grad_clip: float, guard=None, world=None):
    """One optimizer step on host batch (xb, yb) (B, T); returns the LM loss as a 0-d device array
    (reading it would force a host/device synchronisation, so the caller decides when).
    With a guard (minimoe.guards.DivergenceGuard), a step whose loss or gradient norm is not
    finite is not applied and None is returned; the check costs one host copy of two numbers.
    world: the dist.World of a P-rank run (xb, yb: the global batch, the same on every rank); the
    loss and the norm are then the global ones, so every rank takes the same decision."""
    model.forward(xb, yb)  # checks the ids on the host, then moves the batch to the device once
    model.backward()
    if world is not None:
        world.reduce_gradients(model.grads)  # sum over the ranks: the global batch's gradient
    clip, norm_of = (
        (clip_grad_norm, guards.global_norm) if world is None else (world.clip_grad_norm, world.grad_norm)
    )
    norm = clip(model.grads, grad_clip) if grad_clip > 0 else None  # global L2 norm <= grad_clip
    if guard is not None and not guard.step_ok(
        model.stats["lm_loss"], norm_of(model.grads) if norm is None else norm
    ):
        return None
    optimizer.step(model.grads, lr=lr)
    model.update_router_biases()  # DeepSeek-V3 selection bias; no-op for other routers
    return model.stats["lm_loss"]


def load_data(o: TrainOptions, block_size: int, tokenizer=None):
    """(tokenizer, train_ids, val_ids): the corpus o.data, tokenized (with a new o.tokenizer
    tokenizer unless one is given) and split: the last VAL_FRACTION is validation, and each
    part holds at least one window of block_size + 1 tokens."""
    mb = DEFAULTS.max_data_mb if o.max_data_mb is None else o.max_data_mb
    if chat_data.is_chat_data(o.data):  # dialogues: MaskedTokens, the loss on the assistant's tokens only
        return chat_data.load_chat_data(
            o.data, tokenizer, o.tokenizer, o.vocab_size, VAL_FRACTION, int(mb * 2**20)
        )
    text = data.load_corpus(o.data, max_bytes=int(mb * 2**20))
    if tokenizer is None:
        tokenizer = (
            CharTokenizer.from_text(text) if o.tokenizer == "char" else BPETokenizer.train(text, o.vocab_size)
        )
    try:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    except ValueError as e:
        raise data.DataError(
            f"the data {o.data!r} cannot be encoded with the checkpoint's tokenizer ({e})"
        ) from None
    data.check_variety(ids, o.data)
    n, n_val, need = len(ids), int(round(len(ids) * VAL_FRACTION)), block_size + 1
    if min(n - n_val, n_val) < need:
        raise data.DataError(
            f"the data {o.data!r} has {n} tokens, too few for --block-size {block_size}: its training and "
            f"validation parts ({1 - VAL_FRACTION:.0%} / {VAL_FRACTION:.0%}) each need at least {need} "
            f"tokens (about {math.ceil(need / VAL_FRACTION)} in all); use more text or a smaller --block-size"
        )
    train_ids, val_ids = data.train_val_split(ids, VAL_FRACTION, min_len=need)
    return tokenizer, train_ids, val_ids


@dataclass
class Run:
    """One training run: its model, optimizer, data and generators, and the state a checkpoint
    saves (step, losses, wall time) so that a resumed run goes on exactly where it stopped."""

    o: TrainOptions
    model: GPT
    optimizer: AdamW
    tokenizer: object
    train_ids: np.ndarray
    val_ids: np.ndarray
    data_rng: np.random.Generator
    step: int = 0
    start_step: int = 0  # the step this session started from
    saved_at: Optional[int] = None  # the step of the checkpoint on disk (None: none yet)
    last_train_loss: Optional[float] = None
    last_val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    earlier_s: float = 0.0  # wall time of the sessions before this one
    unigram: float = 0.0  # the loss of the best context-free model (the entropy of token frequencies)
    t0: float = dataclasses.field(default_factory=time.time)  # this session's start
    guard: Optional[DivergenceGuard] = None
    pending: list = dataclasses.field(default_factory=list)  # LM losses (0-d arrays) since the last record
    best_step: Optional[int] = None
    signal: Optional[int] = None  # the signal that stopped the run
    cleaned: Optional[str] = None  # a note on the temporary files removed at start
    metrics: Optional[MetricsLog] = None
    world: Optional[dist.World] = None  # the ranks of a P-rank run (None in one process)

    @classmethod
    def start(cls, o: TrainOptions, ckpt=None, world=None) -> Run:
        """A new run from the options, or the checkpoint's run restored exactly; with a world,
        this rank's part of it (resumable under any number of ranks)."""
        base = None
        if ckpt is None and o.init_from:  # fine-tuning: the base's weights and tokenizer (+ chat tokens)
            base, tokenizer = finetune.load_base(o.init_from, o.dtype, o.seed)
            config = base.config
        elif ckpt is None:
            config = model_config(o, vocab_size=256)  # judges the model flags before the slow data work
            tokenizer = None
        else:
            config, tokenizer = ckpt.config, checkpoint.load_tokenizer(ckpt)
        if world is not None:
            dist.check_layout(o.batch_size, world.size)
            mode = dist.choose_mode(config, world.size, o.parallel)
        tokenizer, train_ids, val_ids = load_data(o, config.block_size, tokenizer)
        if base is not None:
            model = base
        elif ckpt is None:
            model = GPT(model_config(o, tokenizer.vocab_size), seed=o.seed, dtype=o.dtype)
        else:
            model = checkpoint.build_model(ckpt, o.dtype)
        optimizer = AdamW(model.params, lr=o.lr, weight_decay=o.weight_decay)
        run = cls(o, model, optimizer, tokenizer, train_ids, val_ids, np.random.default_rng(o.seed))
        run.world = world
        run.unigram = unigram_loss(chat_data.loss_tokens(train_ids), model.config.vocab_size)
        run.guard = DivergenceGuard(o.max_bad_steps, model.config.vocab_size)
        if ckpt is not None:
            checkpoint.load_optimizer_state(ckpt, optimizer, model)
            checkpoint.set_rng_state(run.data_rng, ckpt.rng.get("data"))
            ts = ckpt.train_state
            run.step = run.start_step = run.saved_at = int(ts.get("iteration", 0))
            if not checkpoint.set_rng_state(model.rng, ckpt.rng.get("model")):
                model.rng = backend.make_rng(o.seed + 1 + run.step, model.xp)
            run.last_train_loss, run.last_val_loss = ts.get("last_train_loss"), ts.get("last_val_loss")
            run.best_val_loss, run.earlier_s = ts.get("best_val_loss"), float(ts.get("elapsed_s", 0.0))
            run.best_step, run.guard.skipped = ts.get("best_step"), ts.get("pending_skipped", 0)
            run.pending = [model.xp.asarray(v, dtype=model.dtype) for v in ts.get("pending_losses", [])]
        if world is not None:
            world.attach(model, optimizer, mode)  # after loading: a checkpoint holds every expert
        return run

    def open_metrics(self) -> MetricsLog:
        """OUT/metrics.jsonl for this run's records (minimoe.rundir.open_metrics); on the ranks
        other than 0, nothing (dist.NoMetrics)."""
        if self.world is not None and not self.world.root:
            self.metrics = dist.NoMetrics()
            return self.metrics
        self.metrics, self.cleaned = open_metrics(self.out, self.step)
        return self.metrics

    @property
    def out(self) -> Path:
        return Path(self.o.out)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def tokens(self) -> int:
        """Tokens trained on so far: steps x B x T."""
        return self.step * self.o.batch_size * self.model.config.block_size

    def elapsed(self) -> float:
        """Wall time of the whole run: earlier sessions and this one."""
        return self.earlier_s + time.time() - self.t0

    def describe(self, resuming: bool) -> str:
        o, c = self.o, self.model.config
        counts = count_params(c)
        kind = f"MoE {c.n_experts} experts top-{c.top_k}" if c.n_experts else "dense"
        return (
            f"{'resuming' if resuming else 'training'} {o.preset} ({kind}, {c.n_layer} layers, {c.n_embd} wide, "
            f"{counts['total']:,} params, {counts['active']:,} active) on {o.data!r}: {len(self.train_ids):,} "
            f"train / {len(self.val_ids):,} val {o.tokenizer} tokens, vocab {c.vocab_size}; "
            f"unigram loss {self.unigram:.3f}"
        ) + ("" if self.world is None else "\n" + self.world.describe(self.model))

    def record(self, lr: float, tokens_per_s: float) -> dict:
        """The metrics line of this step: the LM losses kept on the device since the last record
        (copied to the host at once: one synchronisation), speed, time, and the MoE statistics."""
        summary = loss_summary(self.model, self.pending, self.guard.skipped)
        rec = {"step": self.step, **summary, "lr": lr, "tokens_per_s": tokens_per_s,
               "elapsed_s": self.elapsed(), "tokens": self.tokens}  # fmt: skip
        if self.model.config.n_experts:
            rec["moe"] = moe_stats(self.model)
        self.pending, self.guard.skipped = [], 0
        if rec["train_loss_avg"] is not None:
            self.last_train_loss = rec["train_loss_avg"]
        return rec

    def evaluate(self) -> float:
        """The validation loss now (and the best one so far)."""
        o = self.o
        val = estimate_loss(
            self.model, self.val_ids, o.batch_size, self.model.config.block_size, o.eval_iters, o.seed
        )
        self.last_val_loss = val
        if math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss, self.best_step = val, self.step
        return val

    def save(self) -> Path:
        """Write OUT/ckpt.npz: weights, AdamW state, tokenizer, generators and the run's state
        (with the losses since the last record, so that a resumed run reports the same averages).
        Diverged when the weights are not finite: the checkpoint on disk is kept."""
        pending = backend.to_numpy(self.model.xp.stack(self.pending)).tolist() if self.pending else []
        state = {
            "iteration": self.step,
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "last_train_loss": self.last_train_loss,
            "elapsed_s": self.elapsed(),
            "tokens_seen": self.tokens,
            "seed": self.o.seed,
            "options": dataclasses.asdict(self.o),
            "backend": backend.get_backend(),
            "params": count_params(self.model.config),
            "best_step": self.best_step,
            "pending_losses": pending,
            "pending_skipped": self.guard.skipped,
        }
        rngs = {"data": self.data_rng, "model": self.model.rng}
        model, optimizer = self.model, self.optimizer
        if self.world is not None:  # every rank sends its experts; rank 0 alone writes (None elsewhere)
            model, optimizer = self.world.full_state(model, optimizer)
        path, diverged = checkpoint.checkpoint_path(self.out), None
        if model is not None:
            try:
                path = checkpoint.save_checkpoint(self.out, model, optimizer, self.tokenizer, state, rngs)
            except checkpoint.NonFiniteError as e:
                diverged = f"stopped at step {self.step}: the model diverged ({e})"
        if self.world is not None:  # what rank 0 found, every rank acts on
            diverged = self.world.comm.bcast(diverged, root=0)
        if diverged:
            raise Diverged(diverged)
        self.saved_at = self.step
        if model is not None:
            after_save(self.out, path, self.metrics, best=self.o.keep_best and self.best_step == self.step)
        return path

    def unsound(self, val: float = 0.0) -> Optional[str]:
        """Why the model must not replace the checkpoint on disk now (None: it may)."""
        if self.guard.in_row:
            return "its last step had a non-finite loss or gradient"
        return None if math.isfinite(val) else f"its validation loss is {val}"

    def checkpoint_line(self, val: float) -> str:
        """At an evaluation: save unless the model is unsound; the line that says which."""
        head = f"step {self.step}: train loss {self.last_train_loss or math.nan:.4f}, val loss {val:.4f}"
        why = self.unsound(val)
        return f"{head}; not saved: {why}; {self.kept()}" if why else f"{head}; saved {self.save()}"

    def kept(self) -> str:
        """Which checkpoint the run leaves, when it stops without saving."""
        if self.saved_at is None:
            return "no checkpoint was saved"
        return f"the step-{self.saved_at} checkpoint {checkpoint.checkpoint_path(self.out)} is kept"

    def stop(self, in_step: bool) -> str:
        """After Ctrl-C or SIGTERM: save unless the checkpoint is up to date; the line that says so."""
        what = "terminated by SIGTERM" if self.signal == signal.SIGTERM else "interrupted"
        if in_step:  # only a second Ctrl-C lands inside a step: the weights are half updated
            return f"{what} in the middle of step {self.step + 1}; {self.kept()}"
        if self.saved_at != self.step:
            why = self.unsound()
            if why is None:
                try:
                    path = self.save()
                    return f"{what} at step {self.step}: checkpoint saved to {path}; continue with --resume --out {self.out}"
                except Diverged:
                    why = "its weights are not finite"
            return f"{what} at step {self.step}: nothing was saved ({why}); {self.kept()}"
        return f"{what} at step {self.step}: checkpoint {checkpoint.checkpoint_path(self.out)} is up to date"

    def diverged(self, e: Diverged) -> str:
        """The line that ends a diverged run."""
        return f"{e}; {self.kept()}"

    def summary(self, interrupted: bool, diverged: bool = False) -> dict:
        return {
            "iterations": self.step,
            "max_iters": self.o.max_iters,
            "train_loss": self.last_train_loss,
            "val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss,
            "unigram_loss": self.unigram,
            "tokens_seen": self.tokens,
            "elapsed_s": self.elapsed(),
            "session_s": time.time() - self.t0,
            "session_iters": self.step - self.start_step,
            "out": str(self.out),
            "checkpoint": str(checkpoint.checkpoint_path(self.out)),
            "metrics": str(self.metrics_path),
            "params": count_params(self.model.config),
            "interrupted": interrupted,
            "signal": self.signal,
            "diverged": diverged,
            "sample": None,
        }
