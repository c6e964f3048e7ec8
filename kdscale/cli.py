"""The ``kdscale`` command: ``train``, ``shards synth``, ``methods``, ``summary``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kdscale.errors import KdscaleError, exit_on_user_error


def cmd_shards_synth(args) -> None:
    from kdscale.data.synth import write_synthetic_shards

    index = write_synthetic_shards(args.out, num_classes=args.classes, train_samples=args.train,
                                   val_samples=args.val, image_size=args.size, samples_per_shard=args.per_shard,
                                   difficulty=args.difficulty, seed=args.seed, progress=not args.quiet)
    splits = index["splits"]
    print(f"wrote {splits['train']['samples']} train / {splits['val']['samples']} val samples to {args.out}: "
          f"{splits['train']['pattern']}, {splits['val']['pattern']}")


def cmd_methods(_args) -> None:
    from kdscale.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        networks = ", ".join(cls.trainable_networks)
        needs = ", ".join(cls.teacher_outputs) or "none"
        print(f"{name:10s} {cls.description}\n{'':10s} trains: {networks}; frozen-teacher outputs: {needs}")


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise KdscaleError(f"{run_dir}: no summary.json (the run has not finished, or this is not a run directory)")
    with open(path) as fh:
        return json.load(fh)


def format_summary_table(summaries: list[dict]) -> str:
    rows = [("run", "method", "steps", "student top-1", "teacher top-1", "agreement", "images/s")]
    for s in summaries:
        m = s.get("metrics", {})

        def pct(key):
            return f"{m[key]:.2f}" if key in m else "-"

        rows.append((s["experiment"], s["method"], f"{s['step']}/{s['total_steps']}", pct("val/student_top1"),
                     pct("val/teacher_top1"), pct("val/agreement_top1"),
                     f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    details = []
    for s in summaries:
        details.append(f"- {s['experiment']}: run {s['run_dir']}, checkpoint {s.get('checkpoint')}"
                       + (f", export {s['export']}" if s.get("export") else ""))
        if s.get("wandb_sync"):
            details.append(f"  wandb (offline): {s['wandb_sync']}")
    return "\n".join(lines + [""] + details)


def cmd_summary(args) -> None:
    print(format_summary_table([read_summary(d) for d in args.run_dirs]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdscale", description="Distributed knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train or distill (same as python -m kdscale.train)", add_help=False)
    shards = sub.add_parser("shards", help="webdataset shard tools").add_subparsers(dest="shards_command",
                                                                                   required=True)
    synth = shards.add_parser("synth", help="write a synthetic JPEG dataset as tar shards")
    synth.add_argument("--out", required=True)
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--train", type=int, default=5000, help="training samples")
    synth.add_argument("--val", type=int, default=1000, help="validation samples")
    synth.add_argument("--size", type=int, default=32, help="image side in pixels")
    synth.add_argument("--per-shard", type=int, default=500)
    synth.add_argument("--difficulty", type=float, default=0.5, help="0 (easy) .. 1 (hard)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=cmd_shards_synth)
    sub.add_parser("methods", help="list the distillation methods").set_defaults(func=cmd_methods)
    summary = sub.add_parser("summary", help="results table of finished runs")
    summary.add_argument("run_dirs", nargs="+")
    summary.set_defaults(func=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from kdscale.train.__main__ import main as train_main

        train_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        args.func(args)


if __name__ == "__main__":
    main()
