"""The report of ``kdscale plan``: the per-rank table of :mod:`kdscale.planning.memory` as text."""

from __future__ import annotations

from kdscale.config.schema import ExperimentConfig
from kdscale.planning.activations import PROBE_BATCHES
from kdscale.planning.features import features_text
from kdscale.planning.memory import (
    GIB,
    NetworkSizes,
    Plan,
    optimizer_states_per_parameter,
    plan_config,
)

FOOTNOTE = ("rows: strategy and frozen-teacher placement, * the config's. buffers: DDP's reducer buckets, DeepSpeed's "
            "gradient buckets (reduce_bucket_size), and a method's per-sample state (CRD's memory banks). "
            "ZeRO-3 params include what DeepSpeed keeps gathered (an upper "
            "bound). Not counted: CUDA context and cuDNN workspace (~1 GiB), allocator fragmentation.")
SEVERAL_TEACHERS = ("several frozen teachers: a row's placement applies to every online teacher (mixed: each as "
                    "configured); of ZeRO-3 teachers, run one after the other, one working set is counted.")
COLUMNS = (("params", 7), ("grads", 6), ("optim", 6), ("master", 6), ("buffers", 7), ("teacher", 7), ("activ", 6),
           ("total", 7))


def teachers_text(sizes: NetworkSizes) -> str:
    """``; frozen teacher NAME: P M parameters`` for one online teacher, else each teacher by id."""
    if len(sizes.teachers) == 1 and not sizes.teachers[0].replayed:
        return f"; frozen teacher {sizes.teachers[0].name or sizes.teachers[0].id}: {sizes.teacher / 1e6:.2f} M parameters"
    if len(sizes.teachers) < 2:
        return ""
    return "; frozen teachers " + ", ".join(
        f"{t.id} ({t.name or '?'}): " + ("replayed from shards, no parameters" if t.replayed else
                                  f"{t.parameters / 1e6:.2f} M parameters ({t.sharding})") for t in sizes.teachers)


def configured_placement(cfg: ExperimentConfig) -> str:
    """The row label of the config's own frozen-teacher placement."""
    online = {cfg.teacher_sharding(spec) for spec in cfg.teachers if spec.source == "online"}
    if len(online) > 1:
        return "mixed"
    if online:
        return online.pop()
    return "shards" if cfg.teachers else "none"


def format_plan(plan: Plan, cfg: ExperimentConfig, config_path: str | None) -> str:
    from kdscale.engines.deepspeed_config import _config_path, resolve_strategy

    sizes, est, data = plan.sizes, plan.activation, cfg.data
    teacher = teachers_text(sizes)
    header = (
        f"kdscale plan: {config_path or 'overrides'} on {plan.gpus} GPU(s) x {plan.gpu_memory_gib:g} GiB, "
        f"link {plan.link_gbps:g} Gbit/s\n"
        f"method {cfg.method.name}: trained {sizes.trained / 1e6:.2f} M parameters ({sizes.phases} optimizer "
        f"phase(s)){teacher}\n"
        f"optimizer {cfg.optim.name}: {optimizer_states_per_parameter(cfg)} fp32 state(s) per parameter; precision "
        f"{plan.precision} (autocast: weights and gradients stay fp32)\n"
        f"activations: {est.at(data.batch_size, data.image_size) / GIB:.2f} GiB at batch {data.batch_size} x "
        f"{data.image_size}px: {(est.at(1, data.image_size) - est.constant) / 2**20:.2f} MiB per sample + "
        f"{est.constant / 2**20:.1f} MiB (measured on CPU at batches {PROBE_BATCHES[0]} and {PROBE_BATCHES[1]} x "
        f"{est.probe_side}px)\n"
        f"DeepSpeed ZeRO settings: {_config_path(cfg) or 'DeepSpeed defaults (no distributed.deepspeed_config)'}\n"
        + (f"per-sample state: {sizes.state_bytes_per_sample} bytes x {sizes.dataset_size} samples, sharded: "
           f"{sizes.rank_state_bytes(plan.gpus) / GIB:.2f} GiB per rank (in buffers)\n"
           if sizes.state_bytes_per_sample else "")
        + features_text(plan.features))
    lines = [header, f"{'per rank, GiB':18s} " + " ".join(f"{name:>{w}s}" for name, w in COLUMNS)
             + f"  {'comm/step':>10s} {'time':>9s}  fits"]
    configured = {(resolve_strategy(cfg), t) for t in (configured_placement(cfg), "none")}
    for row in plan.rows:
        mark = "*" if (row.strategy, row.teacher_sharding) in configured else " "
        cells = (row.parameters + row.gathered, row.gradients, row.optimizer_states, row.master_weights, row.buffers,
                 row.teacher, row.activations, row.total)
        lines.append(f"{mark}{row.strategy:6s} {row.teacher_sharding:10s} "
                     + " ".join(f"{c / GIB:{w}.2f}" for c, (_, w) in zip(cells, COLUMNS))
                     + f"  {row.comm_bytes / 1e6:7.2f} MB {row.comm_seconds * 1e3:6.1f} ms  "
                     + ("yes" if plan.fits(row) else "no"))
    fitting = [f"{r.strategy}/{r.teacher_sharding}" for r in plan.rows if plan.fits(r)]
    lines += ["", f"fits in {plan.gpu_memory_gib:g} GiB: {', '.join(fitting) or 'none'}", FOOTNOTE]
    if len(sizes.online_teachers) > 1:
        lines.append(SEVERAL_TEACHERS)
    return "\n".join(lines)


def run_plan(args) -> None:
    """``kdscale plan``: load the config like the trainer and print the plan."""
    from kdscale.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(format_plan(plan_config(cfg, args.gpus, args.gpu_memory, args.link_gbps), cfg, args.config))
