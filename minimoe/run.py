"""One training run: its model, optimizer, data and generators, and the state a checkpoint saves
(step, losses, wall time, the losses since the last metrics record), so that a resumed run goes on
exactly where it stopped. `Run.start` builds a new run or restores a saved one; `record`,
`evaluate` and `save` are what the loop in minimoe.train calls; `stop`, `diverged` and `kept`
word the line that ends a run.

    run = Run.start(options, ckpt)        # ckpt: a minimoe.checkpoint.Checkpoint, or None
    rec = run.record(lr, tokens_per_s)    # the metrics line of this step
    val = run.evaluate(); run.save()      # validation loss; OUT/ckpt.npz
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minimoe import backend, chat_data, checkpoint, data, dist, finetune
from minimoe.guards import Diverged, DivergenceGuard
from minimoe.metrics import MetricsLog, estimate_loss, loss_summary, moe_stats, unigram_loss
from minimoe.model import GPT
from minimoe.optim import AdamW
from minimoe.options import DEFAULTS, TrainOptions, model_config
from minimoe.presets import count_params
from minimoe.rundir import after_save, open_metrics
from minimoe.tokenizer import BPETokenizer, CharTokenizer

VAL_FRACTION = 0.1  # the last 10% of the corpus is the validation split


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
