"""The ``kdscale`` command and its subcommands: ``train`` (as ``python -m kdscale.train``),
``shards`` (``synth``, ``from-folder``, ``from-torchvision``, ``from-hf``, ``verify``),
``methods``, ``sweep``, ``bench``, ``compare``, ``plan``, ``checkpoint consolidate`` and
``summary``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kdscale.errors import KdscaleError, exit_on_user_error
from kdscale.sweep import add_parser as add_sweep_parser


def cmd_shards_synth(args) -> None:
    from kdscale.data.synth import write_synthetic_shards

    index = write_synthetic_shards(args.out, num_classes=args.classes, train_samples=args.train,
                                   val_samples=args.val, image_size=args.size, samples_per_shard=args.per_shard,
                                   difficulty=args.difficulty, seed=args.seed, progress=not args.quiet,
                                   photo_like=args.photo_like)
    splits = index["splits"]
    print(f"wrote {splits['train']['samples']} train / {splits['val']['samples']} val samples to {args.out}: "
          f"{splits['train']['pattern']}, {splits['val']['pattern']}")


def cmd_shards_from_folder(args) -> None:
    from kdscale.data.folder_shards import collect_items
    from kdscale.data.shard_writer import write_folder_shards

    items, classes = collect_items(args.src, args.file_list, args.labels, args.out, unlabelled=args.unlabelled)
    index = write_folder_shards(items, classes, args.out, args.split, max_count=args.max_count,
                                max_bytes=int(args.max_size_mb * 2**20), workers=args.workers,
                                progress=not args.quiet)
    entry = index["splits"][args.split]
    what = f"{index['num_classes']} classes" if entry["labelled"] else "unlabelled"
    print(f"wrote {entry['samples']} samples in {len(entry['shards'])} shards ({what}): "
          f"{os.path.join(args.out, entry['pattern'])}")


def _print_splits(index: dict, out: str) -> None:
    splits = index["splits"]
    unlabelled = [name for name, e in splits.items() if not e.get("labelled", True)]
    what = ([f"{index['num_classes']} classes"] if len(unlabelled) < len(splits) else []) + \
        ([f"unlabelled: {', '.join(unlabelled)}"] if unlabelled else [])
    print(f"wrote {' / '.join(str(e['samples']) + ' ' + name for name, e in splits.items())} samples "
          f"({'; '.join(what)}) to {out}: {', '.join(e['pattern'] for e in splits.values())}")


def cmd_shards_from_torchvision(args) -> None:
    from kdscale.data.import_torchvision import import_torchvision

    _print_splits(import_torchvision(args.dataset, args.root, args.out, download=args.download, quality=args.quality,
                                     max_count=args.max_count, max_bytes=int(args.max_size_mb * 2**20),
                                     workers=args.workers, progress=not args.quiet), args.out)


def cmd_shards_from_hf(args) -> None:
    from kdscale.data.import_hf import import_hf

    _print_splits(import_hf(args.path, args.out, args.image_column, args.label_column, args.split,
                            max_count=args.max_count, max_bytes=int(args.max_size_mb * 2**20), workers=args.workers,
                            progress=not args.quiet, unlabelled=args.unlabelled), args.out)


def cmd_shards_verify(args) -> None:
    from kdscale.data.shards import expand_shards
    from kdscale.data.verify import verify_shards

    paths = expand_shards(args.pattern, "pattern")
    num_classes = args.num_classes
    if num_classes is None:
        index_path = os.path.join(os.path.dirname(paths[0]), "index.json")
        if not os.path.isfile(index_path):
            raise KdscaleError(f"no index.json beside {paths[0]}: pass --num-classes")
        num_classes = json.load(open(index_path))["num_classes"]
    problems = verify_shards(paths, num_classes, workers=args.workers, progress=not args.quiet)
    for line in problems:
        print(line)
    print(f"verified {len(paths)} shards: {len(problems)} problem(s)")
    if problems:
        raise SystemExit(1)


def cmd_bench(args) -> None:
    from kdscale.bench.runner import run_bench

    torch_threads = os.environ.get("OMP_NUM_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    run_bench(args)


def cmd_compare(args) -> None:
    from kdscale.analysis.compare import (
        format_table,
        runs_from_dirs,
        runs_from_project,
        summarise,
    )

    if not args.runs and not args.project:
        raise KdscaleError("give run directories or --project ENTITY/PROJECT")
    runs = runs_from_dirs(args.runs) if args.runs else runs_from_project(args.project)
    summaries = [summarise(run, args.metric, args.best) for run in runs]
    groups, keys = None, None
    if args.group_by:
        from kdscale.analysis.seeds import (
            format_groups,
            group_runs,
            group_stats,
            parse_keys,
        )

        keys = parse_keys(args.group_by)
        groups = group_runs(runs, summaries, keys)
        print(format_groups([group_stats(g, args.metric) for g in groups], keys, args.metric))
    else:
        print(format_table(summaries, args.metric))
    if args.plot:
        from kdscale.analysis.plots import plot

        plot(runs, args.metric, args.plot, x=args.x, smooth=args.smooth, groups=groups, keys=keys, title=args.title)
        print(f"plot: {args.plot}")


def cmd_plan(args) -> None:
    from kdscale.planning.report import run_plan

    run_plan(args)


def cmd_methods(_args) -> None:
    """Each method with what it trains and reads, taken from an instance built on small
    CIFAR networks (resnet8 student, resnet20 teacher; a method that needs a student of its own
    kind names one in ``probe_student``), so the listing cannot drift from the code."""
    import warnings

    import torch

    from kdscale.methods import METHODS, MethodContext
    from kdscale.models import build_model

    for name, cls in sorted(METHODS.items()):
        student = getattr(cls, "probe_student", "resnet8")
        context = MethodContext(num_classes=10, image_size=32, method_name=name, student_name=student,
                            teacher_name="resnet20", teacher_network=build_model("resnet20", 10),
                            teacher_role=cls.teacher_role, build_model=lambda model: build_model(model, 10),
                            train_labels=torch.arange(20) % 10,
                            teacher_targets={"teacher": {"summary": (64,), "spatial": (64, 8, 8)}},  # resnet20's
                            teacher_weights={"teacher": 1.0})
        with warnings.catch_warnings():  # untrained probe networks
            warnings.simplefilter("ignore")
            method = cls(build_model(student, 10), cls.Params(), context)
        needs = method.teacher_needs().describe() if cls.teacher_role == "frozen" else "none"
        print(f"{name:10s} {cls.description}\n{'':10s} source: {cls.paper}\n{'':10s} trains: "
              f"{', '.join(method.trained_networks())}; frozen-teacher outputs: {needs}")


def cmd_summary(args) -> None:
    from kdscale.analysis.summary import format_summary_table, summarise_run_dir

    print(format_summary_table([summarise_run_dir(d) for d in args.run_dirs]))


def cmd_checkpoint_consolidate(args) -> None:
    from kdscale.checkpoints import consolidate_student

    path = consolidate_student(args.run_dir, args.network)
    if args.network != "student":
        print(f"{args.network} of the newest checkpoint: {path}")
        return
    print(f"student of the newest checkpoint: {path}\n"
          f"continue in a new run (any number of processes) with: student.weights={path}")


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
    synth.add_argument("--photo-like", action="store_true",
                       help="ImageNet-size JPEGs instead (sides about 500x375, about 110 KB; --size unused)")
    synth.add_argument("--per-shard", type=int, default=500)
    synth.add_argument("--difficulty", type=float, default=0.5, help="0 (easy) .. 1 (hard)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=cmd_shards_synth)
    folder = shards.add_parser("from-folder", help="class-folder tree or file list -> tar shards + index.json")
    folder.add_argument("src", nargs="?", help="root with one subfolder per class (or the root of --file-list paths)")
    folder.add_argument("--file-list", help="lines '<path> <label>' (label: index or class name)")
    folder.add_argument("--out", required=True)
    folder.add_argument("--split", default="train", help="shard name prefix and index.json split (train/val)")
    folder.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    folder.add_argument("--max-size-mb", type=float, default=1024, help="shard size at most")
    folder.add_argument("--workers", type=int, default=2, help="parallel writer processes")
    folder.add_argument("--quiet", action="store_true")
    folder.add_argument("--labels", help="labels of a flat image folder SRC (ImageNet val): '<filename> <class>' "
                        "lines, LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt")
    folder.add_argument("--unlabelled", action="store_true", help="every image under SRC (any layout), written "
                        "without labels (no .cls); index.json marks the split unlabelled (data.labels=none)")
    folder.set_defaults(func=cmd_shards_from_folder)
    tv = shards.add_parser("from-torchvision", help="CIFAR10/100, SVHN, MNIST, FashionMNIST, STL10 as torchvision "
                           "stores them -> train/val JPEG shards + index.json")
    tv.add_argument("dataset", help="CIFAR10, CIFAR100, SVHN, MNIST, FashionMNIST or STL10")
    tv.add_argument("--root", required=True, help="torchvision's root folder of the dataset")
    tv.add_argument("--out", required=True)
    tv.add_argument("--download", action="store_true", help="let torchvision download it (needs a network)")
    tv.add_argument("--quality", type=int, default=95, help="JPEG quality (images keep their size)")
    hf = shards.add_parser("from-hf", help="a Hugging Face image-classification set on disk (parquet or "
                           "save_to_disk arrow) -> shards + index.json")
    hf.add_argument("--path", required=True, help="the dataset folder (Hub parquet layout or save_to_disk)")
    hf.add_argument("--out", required=True)
    hf.add_argument("--image-column", help="default: 'image', or the only Image column")
    hf.add_argument("--label-column", help="default: 'label', or the only ClassLabel column")
    hf.add_argument("--split", action="append", help="NAME or NAME=OUT, repeatable (default: all labelled "
                    "splits; validation, or test without one, becomes val)")
    hf.add_argument("--unlabelled", action="store_true", help="write the splits without labels (no .cls), as "
                    "when the data has no label column; index.json marks them unlabelled (data.labels=none)")
    for importer in (tv, hf):
        importer.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
        importer.add_argument("--max-size-mb", type=float, default=1024, help="shard size at most")
        importer.add_argument("--workers", type=int, default=2, help="parallel writer processes")
        importer.add_argument("--quiet", action="store_true")
    tv.set_defaults(func=cmd_shards_from_torchvision)
    hf.set_defaults(func=cmd_shards_from_hf)
    verify = shards.add_parser("verify", help="decode every sample; report bad ones by key and shard")
    verify.add_argument("pattern", help="brace pattern or glob of the shards")
    verify.add_argument("--num-classes", type=int, help="default: from index.json")
    verify.add_argument("--workers", type=int, default=2)
    verify.add_argument("--quiet", action="store_true")
    verify.set_defaults(func=cmd_shards_verify)
    sub.add_parser("methods", help="list the distillation methods").set_defaults(func=cmd_methods)
    add_sweep_parser(sub)
    bench = sub.add_parser("bench", help="side-by-side throughput and memory ratios (docs/benchmarks.md)")
    bench.add_argument("--quick", action="store_true", help="small settings, a few minutes on 2 cores")
    bench.add_argument("--out", help="output folder (default runs/bench/<time>)")
    bench.add_argument("--sections", default="all", help="comma list of compute, teachers2, compile, data, "
                       "imagenet_data, decode, writer, memory, crd, scaling (default: all)")
    bench.add_argument("--student", default="resnet8")
    bench.add_argument("--teacher", default="resnet56")
    bench.add_argument("--image-size", type=int, default=32)
    bench.add_argument("--batch", type=int, default=64)
    bench.add_argument("--num-classes", type=int, default=10)
    bench.add_argument("--workers", type=int, default=2, help="loader workers in the data section")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--no-peer", action="store_true", help="skip torchdistill")
    bench.add_argument("--profile", action="store_true", help="write a torch.profiler table of the KD step")
    bench.set_defaults(func=cmd_bench)
    compare = sub.add_parser("compare", help="last/best metrics of runs or of seeds per method, next to published "
                             "figures, and a plot (offline runs or a project)")
    compare.add_argument("runs", nargs="*", help="run directories (kdscale run dir, wandb dir or offline-run-* dir)")
    compare.add_argument("--project", help="ENTITY/PROJECT on a wandb server instead of directories")
    compare.add_argument("--metric", default="val/student_top1")
    compare.add_argument("--best", choices=("max", "min"), help="which way is better (default: max for accuracy, "
                         "top-1/top-5 and agreement, min for losses)")
    compare.add_argument("--group-by", help="comma list of run keys (method, student, teacher, dataset, seed) or "
                         "dotted config keys: mean +- std over seeds per group, with the published figure")
    compare.add_argument("--plot", help="write the plot here: .png, .pdf or .svg")
    compare.add_argument("--x", choices=("epochs", "images", "steps"), default="epochs",
                         help="x axis of the plot: epochs, images seen (steps x global batch) or optimizer steps")
    compare.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for noisy curves (losses)")
    compare.add_argument("--title", help="plot title (default none: papers caption their figures)")
    compare.set_defaults(func=cmd_compare)
    plan = sub.add_parser("plan", help="per-rank memory and communication of each strategy, before launching")
    plan.add_argument("--config", required=True, help="the experiment YAML, as for train")
    plan.add_argument("--gpus", type=int, required=True, help="processes (GPUs) in the job")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    plan.add_argument("--link-gbps", type=float, default=100.0, help="per-GPU link speed, Gbit/s")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    plan.set_defaults(func=cmd_plan)
    checkpoint = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="checkpoint_command",
                                                                                  required=True)
    consolidate = checkpoint.add_parser("consolidate", help="the newest checkpoint's student as one safetensors "
                                        "file, gathered from ZeRO shards of any number of processes")
    consolidate.add_argument("run_dir")
    consolidate.add_argument("--network", default="student", help="another trained network of the method, e.g. "
                             "adaptors (the features method's adaptor heads); default: student")
    consolidate.set_defaults(func=cmd_checkpoint_consolidate)
    summary = sub.add_parser("summary", help="results table of finished runs (same images/s as compare)")
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
