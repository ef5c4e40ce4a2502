"""What each `minimoe` command does, once minimoe.cli has parsed its flags (types only): the
values are judged here with minimoe.options, then the work is handed to train, sample, info,
analysis, chat or bench. Every user mistake is a minimoe.errors.UserError (one line at the CLI).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from minimoe import analysis, backend, bench, chat, hf, info, threads
from minimoe.checkpoint import load_checkpoint, load_model
from minimoe.errors import UserError
from minimoe.options import FIELDS, TrainOptions, check_int, check_number
from minimoe.presets import PRESETS, get_preset
from minimoe.sample import StreamDecoder, default_prompt_ids, generate
from minimoe.train import train

EXIT_DIVERGED = 3  # a training run that diverged (docs/guarantees.md)


class CliError(UserError):
    """A user error found by the command line itself (bad flag, missing file, ...)."""


def check_generation_flags(args, min_new_tokens: int) -> None:
    """The flags `sample` and `chat` share: --max-new-tokens, --temperature, --top-k, --seed."""
    check_int("max_new_tokens", args.max_new_tokens, lo=min_new_tokens)
    check_number("temperature", args.temperature, lo=0.0)
    if args.top_k is not None:
        check_int("top_k", args.top_k, lo=1)
    if args.seed is not None:
        check_int("seed", args.seed, lo=0)


def cmd_train(args) -> int:
    summary = train(TrainOptions(**{k: getattr(args, k) for k in FIELDS}))
    if summary["diverged"]:
        return EXIT_DIVERGED
    if summary["interrupted"]:
        return 128 + int(summary["signal"] or signal.SIGINT)
    return 0


def _set_device(name):
    backend.set_backend("cupy" if name == "gpu" else "numpy")


def _encode(tokenizer, text: str, what: str) -> list:
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:  # the tokenizer's own sentence: a character it has never seen
        raise CliError(f"{what} cannot be encoded: {e}") from None


def cmd_sample(args) -> int:
    check_generation_flags(args, min_new_tokens=0)
    if args.threads is not None:
        check_int("threads", args.threads, lo=1)
    _set_device(args.device)
    if args.hf:
        if not (Path(args.hf) / "config.json").is_file():
            raise CliError(
                f"--hf {args.hf!r} is not a local model folder with a config.json (nothing is downloaded)"
            )
        model, tokenizer = hf.load_pretrained(args.hf)
        if tokenizer is None:
            raise CliError(
                f"{args.hf!r} gives no tokenizer (it needs a tokenizer.json and the `tokenizers` package: "
                "pip install tokenizers), so text cannot be encoded for --hf"
            )
    else:
        model, tokenizer, _ = load_model(args.ckpt or "out")
    ids = _encode(tokenizer, args.prompt, "--prompt") if args.prompt else default_prompt_ids(tokenizer)
    threads.apply(args.threads, model.config, tokens=1)  # generation feeds one token at a time
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


def _info_source(args):
    """`minimoe info WHAT`: WHAT is a preset name or a run directory / checkpoint path; or the
    explicit --preset / --ckpt. Sets exactly one of args.preset, args.ckpt."""
    given = [x for x in (args.what, args.preset, args.ckpt) if x is not None]
    if len(given) != 1:
        raise CliError(
            "info needs one thing to describe: a preset name, a run directory or a ckpt.npz "
            f"(e.g. minimoe info mixtral, minimoe info out); got {len(given) or 'none'}"
        )
    if args.what is not None:
        if Path(args.what).exists():
            args.ckpt = args.what
        elif args.what in PRESETS:
            args.preset = args.what
        else:
            raise CliError(
                f"{args.what!r} is neither a run directory or checkpoint file that exists nor a preset; "
                f"valid presets are {', '.join(PRESETS)}"
            )


def cmd_info(args) -> int:
    _info_source(args)
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise CliError(f"unknown preset {args.preset!r}; valid presets are {', '.join(PRESETS)}")
        d = info.info_dict(get_preset(args.preset))
    else:
        ckpt = load_checkpoint(args.ckpt)
        d = info.info_dict(ckpt.config, info.training_summary(ckpt))
    text = info.format_info(d, from_preset=args.preset is not None)
    if args.expert_parallel is not None:
        config = info.Config.from_dict(d["config"])
        tokens = config.block_size if args.tokens is None else args.tokens
        check_int("tokens", tokens, lo=1)
        check_int("bytes", args.bytes, lo=1)
        check_int("devices_per_node", args.devices_per_node, lo=1)
        for name in ("tflops", "node_gbs", "network_gbs"):
            check_number(name, getattr(args, name), strict=True)
        hw = info.Hardware(args.tflops, args.node_gbs, args.network_gbs, args.devices_per_node)
        d["expert_parallel"] = info.expert_parallel_cost(config, args.expert_parallel, tokens, args.bytes, hw)
        text += "\n" + info.format_cost(d["expert_parallel"])
    print(json.dumps(d, indent=2) if args.json else text)
    return 0


def cmd_routes(args) -> int:
    check_int("max_rows", args.max_rows, lo=1)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (optional: only the heat map needs it)
        except ImportError:
            raise CliError(
                "--plot needs matplotlib, which is not installed (pip install matplotlib)"
            ) from None
    _set_device(args.device)
    model, tokenizer, _ = load_model(args.ckpt)
    if not args.text:
        raise CliError("--text is empty; give some text to route")
    if model.config.n_experts == 0:
        raise CliError(f"the model in {args.ckpt!r} is dense (n_experts = 0): it has no routing to show")
    ids = _encode(tokenizer, args.text, "--text")
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


def cmd_chat(args) -> int:
    check_generation_flags(args, min_new_tokens=1)
    _set_device(args.device)
    model, tokenizer, _ = load_model(args.ckpt)
    return chat.run_chat(model, tokenizer, temperature=args.temperature, top_k=args.top_k,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, use_cache=not args.no_cache)  # fmt: skip


def cmd_bench(argv) -> int:
    rc = bench.main(argv)
    return 0 if rc is None else int(rc)
