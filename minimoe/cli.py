"""The `minimoe` command line (also `python -m minimoe`).

    minimoe train  [options]                  train a model (default: the mixtral toy preset on
                                              Python's own documentation text), save OUT/ckpt.npz
    minimoe sample --ckpt OUT --prompt TEXT   stream a continuation
    minimoe info   NAME | OUT (or --preset NAME | --ckpt OUT)  config, parameter and FLOP counts, training summary
    minimoe routes --ckpt OUT --text TEXT     which experts each token goes to, per MoE layer
    minimoe chat   --ckpt OUT                 talk to a model fine-tuned on dialogues
                                              (minimoe train --init-from BASE --data chat-builtin)
    minimoe bench  ...                        benchmarks (minimoe.bench)

A user mistake (a minimoe.errors.UserError, or an OSError on a file) ends the command with exit
status 2 and one line on stderr starting "error: "; anything else is a bug and keeps its
traceback. Ctrl-C ends it with status 130, SIGTERM with 143 (training first saves a checkpoint);
a training run that diverged ends with status 3 (docs/guarantees.md). The parsers only convert
types; minimoe.commands judges the values (with minimoe.options) and does the work.
"""

from __future__ import annotations

import argparse
import os
import sys

from minimoe import backend, chat, dist, info
from minimoe.commands import (
    CliError,
    cmd_bench,
    cmd_chat,
    cmd_info,
    cmd_routes,
    cmd_sample,
    cmd_train,
)
from minimoe.errors import UserError
from minimoe.options import DEFAULTS, DEVICES, PARALLEL, TOKENIZERS
from minimoe.presets import PRESETS, toy_presets

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a SIGTERM ends training with 128 + 15 = 143
THREADS_HELP = "CPU threads to compute with (default: chosen from the model size and the free cores)"


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and then "prog: error: ..." on two lines; we want one line.
    def error(self, message):
        raise CliError(f"{message} (see `{self.prog} --help`)")


# The parsers convert types only (int, float, a fixed set of words); minimoe.options judges the
# values (`minimoe train` in check_options and Config.validate, the other commands below).
def _add_train_args(p):
    def d(name):
        v = getattr(DEFAULTS, name)
        return "the preset's" if v is None else v

    a = p.add_argument
    a("--preset", metavar="NAME", help=f"model preset: {', '.join(toy_presets())} (default {d('preset')})")
    a(
        "--data",
        metavar="SPEC",
        help="builtin (Python's own docs, default) | synthetic | tinyshakespeare "
        "(downloaded once) | PATH of a UTF-8 text file | chat-builtin or FILE.jsonl: dialogues, "
        "the loss on the assistant's turns only",
    )
    a("--tokenizer", choices=TOKENIZERS, help=f"(default {d('tokenizer')})")
    a("--vocab-size", type=int, metavar="N", help=f"BPE vocabulary size, >= 256 (default {d('vocab_size')})")
    a("--out", metavar="DIR", help=f"run directory for ckpt.npz and metrics.jsonl (default {d('out')})")
    a("--max-iters", type=int, metavar="N", help=f"optimizer steps (default {d('max_iters')})")
    a("--batch-size", type=int, metavar="B", help=f"(default {d('batch_size')})")
    a("--block-size", type=int, metavar="T", help="context length (default: the preset's)")
    a("--n-layer", type=int, metavar="N", help="(default: the preset's)")
    a("--n-head", type=int, metavar="N", help="(default: the preset's)")
    a("--n-embd", type=int, metavar="C", help="(default: the preset's)")
    a("--n-experts", type=int, metavar="E", help="experts per MoE layer, 0 = dense (default: the preset's)")
    a("--top-k", type=int, metavar="K", help="experts per token (default: the preset's)")
    a(
        "--capacity-groups",
        type=int,
        metavar="G",
        help="apply the capacity per group of B*T/G tokens, as G ranks do (default: the preset's, 1)",
    )
    a("--dropout", type=float, metavar="P", help="dropout probability (default: the preset's, 0)")
    a("--lr", type=float, help=f"peak learning rate (default {d('lr')})")
    a("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    a("--warmup-iters", type=int, metavar="N", help=f"(default {d('warmup_iters')})")
    a("--weight-decay", type=float, metavar="WD", help=f"AdamW decoupled decay (default {d('weight_decay')})")
    a("--grad-clip", type=float, metavar="NORM", help=f"global norm, 0 = off (default {d('grad_clip')})")
    a(
        "--eval-interval",
        type=int,
        metavar="N",
        help=f"evaluate + save every N steps (default {d('eval_interval')})",
    )
    a("--eval-iters", type=int, metavar="N", help=f"batches per evaluation (default {d('eval_iters')})")
    a("--log-interval", type=int, metavar="N", help=f"steps per metrics line (default {d('log_interval')})")
    a("--seed", type=int, help=f"(default {d('seed')})")
    a("--device", choices=DEVICES, help="gpu uses CuPy (default cpu)")
    a("--dtype", choices=backend.DTYPES, help=f"(default {d('dtype')})")
    a("--resume", action="store_true", default=None, help="continue the run saved in --out")
    a(
        "--sample-tokens",
        type=int,
        metavar="N",
        help=f"tokens sampled at the end (default {d('sample_tokens')})",
    )
    a(
        "--init-from",
        metavar="CKPT",
        help="start from this base checkpoint's weights and tokenizer (fine-tuning)",
    )
    a(
        "--parallel",
        choices=PARALLEL,
        help="under mpiexec: data (every rank holds the whole model), expert (each rank holds E/P "
        "experts of each MoE layer) or auto (default: expert when the experts split evenly, else data)",
    )
    a("--threads", type=int, metavar="N", help=THREADS_HELP)
    _add_guard_args(a, d)


def _add_guard_args(a, d):
    """The flags of the run's guards (docs/guarantees.md)."""
    a("--max-bad-steps", type=int, metavar="N",
      help=f"stop after N steps in a row with a non-finite loss or gradient (default {d('max_bad_steps')})")  # fmt: skip
    a(
        "--keep-best",
        action="store_true",
        default=None,
        help="also keep OUT/best.npz, the best validation loss",
    )
    a(
        "--max-data-mb",
        type=float,
        metavar="MB",
        help=f"largest --data file read (default {d('max_data_mb')})",
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
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="(default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="fixes the sampled tokens (default: random)")
    p.add_argument("--no-cache", action="store_true", help="recompute the context for every token (slow)")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("info", help="config, parameters and FLOPs of a preset or checkpoint")
    p.add_argument(
        "what", nargs="?", metavar="PRESET|PATH", help="a preset name, a run directory or a ckpt.npz"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help=f"one of {', '.join(PRESETS)}")
    src.add_argument("--ckpt", metavar="PATH", help="run directory or ckpt.npz")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("the cost of expert parallelism (docs/distributed.md)")
    g.add_argument("--expert-parallel", type=int, metavar="P", help="the experts spread over P devices")
    g.add_argument("--tokens", type=int, metavar="T", help="tokens per device per step (default: block_size)")
    g.add_argument("--bytes", type=int, default=2, metavar="N", help="bytes per activation (default 2: bf16)")
    hw = info.Hardware()
    g.add_argument(
        "--tflops", type=float, default=hw.tflops, help=f"achieved TFLOP/s per device ({hw.tflops:g})"
    )
    g.add_argument(
        "--node-gbs", type=float, default=hw.node_gbs, help=f"GB/s inside a node ({hw.node_gbs:g})"
    )
    g.add_argument(
        "--network-gbs", type=float, default=hw.network_gbs, help=f"GB/s between nodes ({hw.network_gbs:g})"
    )
    g.add_argument(
        "--devices-per-node", type=int, default=hw.devices_per_node, metavar="N", help="(default 8)"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("routes", help="which experts each token of a text goes to")
    p.add_argument("--ckpt", default="out", metavar="PATH", help="run directory or ckpt.npz (default out)")
    p.add_argument("--text", required=True, help="the text to route")
    p.add_argument("--plot", metavar="FILE.png", help="also save a heat map (needs matplotlib)")
    p.add_argument("--max-rows", type=int, default=200, metavar="N", help="table rows shown (default 200)")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.set_defaults(func=cmd_routes)

    _add_chat_parser(sub)
    sub.add_parser("bench", help="benchmarks (minimoe bench --help)", add_help=False)
    return parser


# ------------------------------------------------------------------------------------- commands
def _add_chat_parser(sub):
    p = sub.add_parser("chat", help="talk to a fine-tuned model", description=chat.HELP)
    p.add_argument("--ckpt", default="out", metavar="PATH", help="run directory or ckpt.npz (default out)")
    p.add_argument("--temperature", type=float, default=0.6, metavar="T", help="0 = greedy (default 0.6)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="per reply (default 200)")
    p.add_argument("--seed", type=int, default=None, help="fixes the sampled replies (default: random)")
    p.add_argument("--no-cache", action="store_true", help="recompute the context for every token (slow)")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.set_defaults(func=cmd_chat)


# ----------------------------------------------------------------------------------------- main
def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted).

    Only a minimoe.errors.UserError (a bad flag, file, config, checkpoint or device) and an
    OSError (a file that cannot be read or written) become one `error:` line; anything else is
    a bug and propagates with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:  # the CLI boundary: user mistakes become one line, never a traceback
        sys.stdout.flush()
        if dist.is_rank0():  # under mpiexec every rank has the same error: rank 0 says it once
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
