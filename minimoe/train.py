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
minimoe.run (one run's state: start or resume, record, evaluate, save), minimoe.metrics (what
is measured and logged), minimoe.progress (the display) and minimoe.signals (the deferred Ctrl-C).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import numpy as np

from minimoe import backend, checkpoint, data, dist, finetune, guards
from minimoe.guards import Diverged
from minimoe.optim import clip_grad_norm, cosine_lr
from minimoe.options import (
    DEFAULTS,
    TrainOptions,
    check_options,
    given_options,
    model_config,
    resolve_options,
)
from minimoe.progress import Progress, format_duration
from minimoe.run import Run
from minimoe.rundir import RunLock
from minimoe.sample import sample_text
from minimoe.signals import StopRequest


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
