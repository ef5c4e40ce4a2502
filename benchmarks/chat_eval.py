"""Before and after supervised fine-tuning on dialogues (#18), for the dense and mixtral presets.

    PYTHONPATH=. python benchmarks/chat_eval.py                                 # the defaults below
    PYTHONPATH=. python benchmarks/chat_eval.py --presets mixtral --base-iters 300 --ft-iters 200

For each preset:
  1. base: `minimoe train --preset P --data builtin` (char tokenizer, --base-iters steps);
  2. chat: `minimoe train --init-from BASE --data chat-builtin` (--ft-iters steps);
  3. measured on held-out data, BEFORE (the base model with the chat tokens added, as fine-tuning
     starts) and AFTER:
     - exact match: greedy replies to --questions held-out requests (arithmetic, copy, reverse;
       chat_data.eval_questions), each in a fresh conversation; a hit is a reply equal to the answer;
     - masked validation loss: the cross-entropy on the assistant's tokens of held-out conversations
       (the loss fine-tuning minimises), --eval-iters batches;
     - MoE only, routing on the held-out conversations' tokens, per layer: the expert load on the
       assistant's tokens, its total-variation distance to the load on the other tokens (user turns,
       markers), and the fraction of tokens whose first-choice expert is the same before and after.
Existing runs in --out with the right step count are reused (delete them to retrain). Prints
Markdown tables with the machine's load average; --json writes every number. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from minimoe import analysis, chat_data, checkpoint  # noqa: E402
from minimoe.chat import exact_match, routing_by_role  # noqa: E402
from minimoe.finetune import load_base  # noqa: E402
from minimoe.metrics import estimate_loss  # noqa: E402
from minimoe.train import train  # noqa: E402


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def ensure_run(out: str, iters: int, **options) -> float:
    """Train into `out` unless a checkpoint at `iters` steps is there; the seconds it took (0: reused)."""
    path = checkpoint.checkpoint_path(out)
    if path.is_file() and checkpoint.load_checkpoint(out).train_state.get("iteration") == iters:
        return 0.0
    t0 = time.time()
    train(dict(options, out=out, max_iters=iters, sample_tokens=0), quiet=True)
    return time.time() - t0


def measure(model, tokenizer, questions, val_convs, eval_iters: int) -> dict:
    _, _, val = chat_data.load_chat_data(chat_data.CHAT_BUILTIN, tokenizer)
    T = model.config.block_size
    res = {
        "exact_match": exact_match(model, tokenizer, questions),
        "masked_val_loss": estimate_loss(model, val, 12, T, eval_iters, seed=0),
    }
    if model.config.n_experts:
        res["routes"] = routing_by_role(model, tokenizer, val_convs)
    return res


def tv(p, q) -> float:
    return float(0.5 * np.abs(p - q).sum())


def routing_rows(preset, before, after, E) -> list[str]:
    rows = []
    for b, a in zip(before["routes"], after["routes"]):
        loads = {k: {r: analysis.expert_load(x[r], E) for r in ("assistant", "other")} for k, x in
                 (("before", b), ("after", a))}  # fmt: skip
        same = {r: float((b[r][:, 0] == a[r][:, 0]).mean()) for r in ("assistant", "other")}
        fmt = lambda p: " ".join(f"{100 * f:.0f}" for f in p)  # noqa: E731
        rows.append(
            f"| {preset} | {b['layer']} | {fmt(loads['before']['assistant'])} | {fmt(loads['after']['assistant'])} "
            f"| {tv(loads['before']['assistant'], loads['before']['other']):.2f} -> "
            f"{tv(loads['after']['assistant'], loads['after']['other']):.2f} "
            f"| {100 * same['assistant']:.0f}% | {100 * same['other']:.0f}% |"
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="dense,mixtral")
    p.add_argument("--base-iters", type=int, default=1500, help="base training steps (default 1500)")
    p.add_argument("--ft-iters", type=int, default=1000, help="fine-tuning steps (default 1000)")
    p.add_argument("--questions", type=int, default=300, help="held-out requests (default 300)")
    p.add_argument("--eval-iters", type=int, default=40, help="batches of 12 for the masked val loss")
    p.add_argument("--routing-convs", type=int, default=200, help="held-out conversations routed")
    p.add_argument("--seed", type=int, default=0, help="of the fine-tuning run (data order); the base uses 0")
    p.add_argument("--out", default="runs/chat_eval")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    args = p.parse_args(argv)

    questions = chat_data.eval_questions(args.questions)
    val_convs = chat_data.chat_builtin("val")[: args.routing_convs]
    results, table, routing = {}, [], []
    start_load = load_avg()
    for preset in args.presets.split(","):
        base_dir = os.path.join(args.out, f"{preset}-base")
        chat_dir = os.path.join(args.out, f"{preset}-chat" + (f"-seed{args.seed}" if args.seed else ""))
        t_base = ensure_run(base_dir, args.base_iters, preset=preset, data="builtin")
        t_ft = ensure_run(chat_dir, args.ft_iters, init_from=base_dir, data="chat-builtin", seed=args.seed)
        before_model, tok = load_base(base_dir, seed=args.seed)  # as fine-tuning starts: chat tokens added
        after_model, tok_after, _ = checkpoint.load_model(chat_dir)
        assert tok_after.to_dict() == tok.to_dict()
        before = measure(before_model, tok, questions, val_convs, args.eval_iters)
        after = measure(after_model, tok, questions, val_convs, args.eval_iters)
        results[preset] = {"before": before, "after": after, "train_s": {"base": t_base, "finetune": t_ft}}
        for when, r in (("before", before), ("after", after)):
            em = r["exact_match"]
            table.append(
                f"| {preset} | {when} | {100 * em['all']:.1f}% | {100 * em['arith']:.1f}% | {100 * em['copy']:.1f}% "
                f"| {100 * em['reverse']:.1f}% | {r['masked_val_loss']:.3f} |"
            )
        if after_model.config.n_experts:
            routing += routing_rows(preset, before, after, after_model.config.n_experts)
        print(
            f"{preset}: base {t_base:.0f} s, fine-tune {t_ft:.0f} s (0 = reused); load {load_avg()}",
            flush=True,
        )

    print(f"\nbase: {args.base_iters} steps on builtin (char); fine-tune: {args.ft_iters} steps on chat-builtin "
          f"(seed {args.seed}); "
          f"{args.questions} held-out requests, greedy; load average {start_load} at the start, {load_avg()} at the end\n")  # fmt: skip
    print("| preset | model | exact match | arithmetic | copy | reverse | masked val loss |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))
    if routing:
        print(
            "\nExpert load on the assistant's tokens (% per expert), before -> after fine-tuning; TV = total"
        )
        print("variation distance between the load on assistant tokens and on the other tokens; the last two")
        print("columns: tokens whose first-choice expert is unchanged by fine-tuning.\n")
        print("| preset | layer | assistant load before | assistant load after | TV(assistant, other) | "
              "same 1st choice (assistant) | same 1st choice (other) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        print("\n".join(routing))
    if args.json:

        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return x.tolist() if isinstance(x, np.ndarray) else x

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(plain(results), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
