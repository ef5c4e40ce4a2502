"""The `minimoe` command line (also `python -m minimoe`).

    minimoe train  [options]                  train a model (default: the mixtral toy preset on
                                              Python's own documentation text), save OUT/ckpt.npz
    minimoe sample --ckpt OUT --prompt TEXT   stream a continuation
    minimoe info   --preset NAME | --ckpt OUT config, parameter and FLOP counts, training summary
    minimoe routes --ckpt OUT --text TEXT     which experts each token goes to, per MoE layer
    minimoe bench  ...                        benchmarks (minimoe.bench)

A user mistake ends the command with exit status 2 and one line on stderr starting "error: ";
Ctrl-C ends it with status 130 (training first saves a checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys

from minimoe import backend
from minimoe.checkpoint import CheckpointError
from minimoe.data import DataError
from minimoe.presets import PRESETS, count_params, get_preset
from minimoe.train import TrainOptions

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user error found by the command line itself (bad flag, missing file, ...)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and then "prog: error: ..." on two lines; we want one line.
    def error(self, message):
        raise CliError(f"{message} (see `{self.prog} --help`)")


def _int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}")
        return v

    return parse


def _float_at_least(lo, strict=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not (v > lo if strict else v >= lo) or v != v:
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {lo}, got {s!r}")
        return v

    return parse


POS_INT, NONNEG_INT = _int_at_least(1), _int_at_least(0)
POS_FLOAT, NONNEG_FLOAT = _float_at_least(0.0, strict=True), _float_at_least(0.0)


def _default(name):
    v = getattr(TrainOptions(), name)
    return "the preset's" if v is None else v


def _add_train_args(p):
    d = _default
    a = p.add_argument
    toys = ", ".join(k for k, v in PRESETS.items() if not v.get("counted_only"))
    a("--preset", metavar="NAME", help=f"model preset: {toys} (default {d('preset')})")
    a(
        "--data",
        metavar="SPEC",
        help="builtin (Python's own docs, default) | synthetic | tinyshakespeare "
        "(downloaded once) | PATH of a UTF-8 text file",
    )
    a("--tokenizer", choices=["char", "bpe"], help=f"(default {d('tokenizer')})")
    a(
        "--vocab-size",
        type=_int_at_least(256),
        metavar="N",
        help=f"BPE vocabulary size (default {d('vocab_size')})",
    )
    a("--out", metavar="DIR", help=f"run directory for ckpt.npz and metrics.jsonl (default {d('out')})")
    a("--max-iters", type=POS_INT, metavar="N", help=f"optimizer steps (default {d('max_iters')})")
    a("--batch-size", type=POS_INT, metavar="B", help=f"(default {d('batch_size')})")
    a("--block-size", type=POS_INT, metavar="T", help="context length (default: the preset's)")
    a("--n-layer", type=POS_INT, metavar="N", help="(default: the preset's)")
    a("--n-head", type=POS_INT, metavar="N", help="(default: the preset's)")
    a("--n-embd", type=POS_INT, metavar="C", help="(default: the preset's)")
    a(
        "--n-experts",
        type=NONNEG_INT,
        metavar="E",
        help="routed experts per MoE layer, 0 = dense (default: the preset's)",
    )
    a("--top-k", type=POS_INT, metavar="K", help="experts per token (default: the preset's)")
    a("--dropout", type=NONNEG_FLOAT, metavar="P", help="dropout probability (default: the preset's, 0)")
    a("--lr", type=POS_FLOAT, help=f"peak learning rate (default {d('lr')})")
    a("--min-lr", type=NONNEG_FLOAT, help="final learning rate of the cosine (default lr/10)")
    a("--warmup-iters", type=NONNEG_INT, metavar="N", help=f"(default {d('warmup_iters')})")
    a(
        "--weight-decay",
        type=NONNEG_FLOAT,
        metavar="WD",
        help=f"AdamW decoupled decay (default {d('weight_decay')})",
    )
    a(
        "--grad-clip",
        type=NONNEG_FLOAT,
        metavar="NORM",
        help=f"global norm, 0 = off (default {d('grad_clip')})",
    )
    a(
        "--eval-interval",
        type=POS_INT,
        metavar="N",
        help=f"evaluate and checkpoint every N steps (default {d('eval_interval')})",
    )
    a("--eval-iters", type=POS_INT, metavar="N", help=f"batches per evaluation (default {d('eval_iters')})")
    a(
        "--log-interval",
        type=POS_INT,
        metavar="N",
        help=f"steps per metrics line (default {d('log_interval')})",
    )
    a("--seed", type=NONNEG_INT, help=f"(default {d('seed')})")
    a("--device", choices=["cpu", "gpu"], help="gpu uses CuPy (default cpu)")
    a("--dtype", choices=["float32", "float64"], help=f"(default {d('dtype')})")
    a("--resume", action="store_true", default=None, help="continue the run saved in --out")
    a(
        "--sample-tokens",
        type=NONNEG_INT,
        metavar="N",
        help=f"tokens sampled at the end (default {d('sample_tokens')})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minimoe",
        description="Train, sample and inspect small Mixture-of-Experts GPTs written in NumPy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a model", description="Train a model; Ctrl-C saves a checkpoint.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sample",
        help="generate text from a checkpoint",
        description="Stream a continuation of --prompt from a trained model.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="PATH", help="run directory or ckpt.npz (default out)")
    src.add_argument("--hf", metavar="DIR", help="a local Hugging Face model folder (minimoe.hf)")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=NONNEG_INT, default=200, metavar="N", help="(default 200)")
    p.add_argument(
        "--temperature", type=NONNEG_FLOAT, default=0.8, metavar="T", help="0 = greedy (default 0.8)"
    )
    p.add_argument(
        "--top-k", type=POS_INT, default=None, metavar="K", help="sample among the K likeliest tokens"
    )
    p.add_argument("--seed", type=NONNEG_INT, default=None, help="fixes the sampled tokens (default: random)")
    p.add_argument("--no-cache", action="store_true", help="recompute the context for every token (slow)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("info", help="config, parameters and FLOPs of a preset or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME", help=f"one of {', '.join(PRESETS)}")
    src.add_argument("--ckpt", metavar="PATH", help="run directory or ckpt.npz")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("routes", help="which experts each token of a text goes to")
    p.add_argument("--ckpt", default="out", metavar="PATH", help="run directory or ckpt.npz (default out)")
    p.add_argument("--text", required=True, help="the text to route")
    p.add_argument("--plot", metavar="FILE.png", help="also save a heat map (needs matplotlib)")
    p.add_argument(
        "--max-rows", type=POS_INT, default=200, metavar="N", help="table rows shown (default 200)"
    )
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.set_defaults(func=cmd_routes)

    sub.add_parser("bench", help="benchmarks (minimoe bench --help)", add_help=False)
    return parser


# ------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from minimoe.train import train

    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    summary = train(options)
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


def _set_device(name):
    backend.set_backend("cupy" if name == "gpu" else "numpy")


def cmd_sample(args) -> int:
    from minimoe.sample import StreamDecoder, default_prompt_ids, generate

    _set_device(args.device)
    if args.hf:
        try:
            hf = importlib.import_module("minimoe.hf")
        except ModuleNotFoundError as e:
            missing = (
                "minimoe.hf is not part of this installation"
                if e.name == "minimoe.hf"
                else (f"--hf needs the Python package {e.name!r} (pip install 'minimoe[hf]')")
            )
            raise CliError(missing) from None
        model, tokenizer = hf.load_pretrained(args.hf)
        if tokenizer is None:
            raise CliError(
                f"{args.hf!r} gives no tokenizer (it needs a tokenizer.json and the `tokenizers` package: "
                "pip install tokenizers), so text cannot be encoded for --hf"
            )
    else:
        from minimoe.checkpoint import load_model

        model, tokenizer, _ = load_model(args.ckpt or "out")
    ids = list(tokenizer.encode(args.prompt)) if args.prompt else default_prompt_ids(tokenizer)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    dec = StreamDecoder(tokenizer)

    def on_token(i):
        piece = dec.push(i)
        if piece:
            out.write(piece)
            out.flush()

    generate(
        model,
        ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        use_cache=not args.no_cache,
        on_token=on_token,
    )
    out.write(dec.flush() + "\n")
    out.flush()
    return 0


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _info_dict(config, training=None) -> dict:
    counts = count_params(config)
    d = {"name": config.name, "config": config.to_dict(), **counts}
    if training is not None:
        d["training"] = training
    return d


def _training_summary(ckpt) -> dict:
    ts = ckpt.train_state
    opts = ts.get("options", {})
    return {
        "iterations": ts.get("iteration"),
        "max_iters": opts.get("max_iters"),
        "train_loss": ts.get("last_train_loss"),
        "val_loss": ts.get("last_val_loss"),
        "best_val_loss": ts.get("best_val_loss"),
        "tokens_seen": ts.get("tokens_seen"),
        "wall_time_s": ts.get("elapsed_s"),
        "data": opts.get("data"),
        "tokenizer": (ckpt.tokenizer or {}).get("type"),
        "backend": ts.get("backend"),
    }


def cmd_info(args) -> int:
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise CliError(f"unknown preset {args.preset!r}; valid presets are {', '.join(PRESETS)}")
        info = _info_dict(get_preset(args.preset))
    else:
        from minimoe.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.ckpt)
        info = _info_dict(ckpt.config, _training_summary(ckpt))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    print(
        f"{info['name'] or 'model'}"
        + ("  (published full-size configuration: counted, never built)" if cfg.get("counted_only") else "")
    )
    width = max(len(k) for k in cfg)
    for k, v in cfg.items():
        print(f"  {k:<{width}}  {v}")
    tot, act = info["total"], info["active"]
    print(
        f"parameters: {tot:,} total ({_human(tot)}), {act:,} active per token ({_human(act)}, "
        f"{100 * act / tot:.1f}%)"
    )
    print(
        f"FLOPs per token: {_human(info['flops_per_token'])} forward, "
        f"{_human(info['train_flops_per_token'])} training (3x forward) at context {cfg['block_size']}"
    )
    tr = info.get("training")
    if args.preset is not None and not cfg.get("counted_only"):
        print("(a toy preset's vocab_size is a placeholder: `minimoe train` takes it from the tokenizer)")
    if tr:

        def f(x, fmt="{:.4f}"):
            return "n/a" if x is None else fmt.format(x)

        print(
            f"training: {tr['iterations']} of {tr['max_iters']} steps on {tr['data']!r} ({tr['tokenizer']} "
            f"tokenizer), {f(tr['tokens_seen'], '{:,}')} tokens seen, "
            f"wall time {f(tr['wall_time_s'], '{:.1f}')} s"
        )
        print(
            f"  last train loss {f(tr['train_loss'])}, last val loss {f(tr['val_loss'])}, "
            f"best val loss {f(tr['best_val_loss'])}"
        )
    return 0


def cmd_routes(args) -> int:
    from minimoe import analysis
    from minimoe.checkpoint import load_model

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError(
                "--plot needs matplotlib, which is not installed (pip install matplotlib)"
            ) from None
    _set_device(args.device)
    model, tokenizer, _ = load_model(args.ckpt)
    if not args.text:
        raise CliError("--text is empty; give some text to route")
    ids = tokenizer.encode(args.text)
    routes = analysis.route_tokens(model, ids)
    tokens = [tokenizer.decode([i]) for i in ids]
    E = model.config.n_experts
    print(
        f"{len(ids)} tokens, {len(routes)} MoE layers, {E} experts, top-{model.config.top_k}; "
        "cells: chosen experts, first choice first"
    )
    print(analysis.routing_table(tokens, routes, max_rows=args.max_rows))
    print(analysis.routing_summary(routes, E))
    if args.plot:
        analysis.plot_routes(tokens, routes, E, args.plot)
        print(f"heat map saved to {args.plot}")
    return 0


def cmd_bench(argv) -> int:
    try:
        bench = importlib.import_module("minimoe.bench")
    except ModuleNotFoundError as e:
        if e.name == "minimoe.bench":
            raise CliError(
                "`minimoe bench` is not available: minimoe.bench is not part of this installation"
            ) from None
        raise CliError(
            f"`minimoe bench` needs the Python package {e.name!r}, which is not installed"
        ) from None
    rc = bench.main(argv)
    return 0 if rc is None else int(rc)


# ----------------------------------------------------------------------------------------- main
def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (CliError, DataError, CheckpointError, backend.BackendError, ValueError) as e:
        # the CLI boundary: user mistakes become one line, never a traceback
        sys.stdout.flush()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `minimoe sample | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as e:
        sys.stdout.flush()
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("", flush=True)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
