"""Compute-path benchmarks on in-memory batches (no data loading):

- framework overhead: kdscale's KD step (engine + frozen teacher + Distiller) against a
  minimal hand-written PyTorch loop doing the same math with the same models, batch,
  dtype and optimizer;
- teacher cost: student-only vs online-teacher KD vs KD from stored teacher outputs. The
  bound of the online case is measured in the same round: a student-only step followed by
  the teacher's own forward at the same batch, so online KD at 1.0 of its bound costs
  exactly the teacher's forward more than student-only training, and below 1.0 it costs
  more than that. The FLOP model ``3 F_s / (3 F_s + F_t)`` of the same ratio is kept as
  information only (``flop_model``): it holds when both networks are compute-bound and
  not for small networks bound by per-operator overhead;
- peer: torchdistill's DistillationBox on the same KD configuration, models and batches,
  plus the loss both compute on the same first batch;
- several teachers (section ``teachers2``, :func:`bench_teachers`): KD from two online frozen
  teachers (random weights, the ``--teacher`` network twice) against its bound, a student-only
  step plus each teacher's forward, measured the same way in the same round; and KD from two
  replayed teachers against student-only. Both go through the trainer's
  :class:`~kdscale.train.teacher_source.TeacherSource` (members, their mean, the ensemble
  target of the method).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from kdscale.bench.timing import (
    forward_flops,
    interleaved_rounds,
    ratio_over_rounds,
    throughput_summary,
)
from kdscale.config import load_config
from kdscale.engines import DDPEngine
from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.models import build_model
from kdscale.parallel.context import DistContext
from kdscale.runtime.device import autocast
from kdscale.teachers.frozen import FrozenTeacher

T, CE_WEIGHT, KD_WEIGHT, LR = 4.0, 0.1, 0.9, 0.05


class Setup:
    def __init__(self, student: str, teacher: str, image_size: int, batch: int, num_classes: int, device: str,
                 teachers: int = 1):
        self.device = torch.device(device)
        self.ctx = DistContext(0, 1, 0, self.device)
        self.on_gpu = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.on_gpu else None
        torch.manual_seed(0)
        self.student = build_model(student, num_classes).to(self.device)
        self.teacher = build_model(teacher, num_classes).to(self.device).eval().requires_grad_(False)
        if self.on_gpu:
            self.student = self.student.to(memory_format=torch.channels_last)
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(1)
        self.images = torch.randn(batch, 3, image_size, image_size, generator=gen).to(self.device)
        if self.on_gpu:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.targets = torch.randint(0, num_classes, (batch,), generator=gen).to(self.device)
        self.cfg = load_config(None, [f"data.batch_size={batch}", "optim.name=sgd", f"optim.lr={LR}",
                                      "optim.momentum=0.9", "optim.weight_decay=5e-4"])
        self.image_size, self.batch, self.num_classes = image_size, batch, num_classes
        self.teachers = [self.teacher]  # more: the same network, other random weights
        for i in range(1, teachers):
            torch.manual_seed(i)
            extra = build_model(teacher, num_classes).to(self.device).eval().requires_grad_(False)
            self.teachers.append(extra.to(memory_format=torch.channels_last) if self.on_gpu else extra)

    def autocast(self):
        return autocast(self.device, self.dtype)

    def kdscale_step(self, method: str, teacher_source: str, teachers: int = 1):
        """One training step of ``method`` with its teachers ``online``, replayed from stored
        outputs (``shards``) or ``none``; ``teachers`` > 1: the first ``teachers`` of :attr:`teachers`
        through the trainer's teacher source."""
        cls = get_method_class(method)
        params = cls.Params(temperature=T, ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT) if method == "kd" else cls.Params()
        ids = tuple(f"teacher{i}" for i in range(teachers)) if teachers > 1 else ()
        distiller = cls(copy.deepcopy(self.student), params,
                        MethodContext(self.num_classes, self.image_size, teacher_ids=ids)).train()
        engine = DDPEngine(distiller, self.cfg, self.ctx)
        if teachers > 1:
            source, replayed = self.teacher_source(teacher_source, ids)

            def step():
                engine.micro_step("all", self.images, self.targets, source(self.images, replayed), True, LR,
                                  self.autocast)
            return step
        frozen = self.frozen_teacher()
        with torch.no_grad():
            stored = TeacherOutput(torch.log_softmax(frozen(self.images).logits.float(), 1))

        def step():
            if teacher_source == "online":
                out = frozen(self.images)
            else:
                out = stored if teacher_source == "shards" else None
            engine.micro_step("all", self.images, self.targets, out, True, LR, self.autocast)
        return step

    def frozen_teacher(self, index: int = 0) -> FrozenTeacher:
        """A fresh copy of a teacher, frozen as the online KD step runs it (logits only)."""
        return FrozenTeacher(copy.deepcopy(self.teachers[index]), [], self.device, self.dtype, self.on_gpu)

    def teacher_source(self, source: str, ids: tuple[str, ...]):
        """The trainer's :class:`TeacherSource` over the first ``len(ids)`` teachers, equal weights,
        and what a batch gives it: ``online``, each runs (None); ``shards``, the teachers' stored
        probabilities, ``(B, teachers, classes)`` as the loader replays them."""
        from kdscale.lifecycle.watchdog import Watchdog
        from kdscale.train.teacher_source import Member, TeacherSource

        frozen = [self.frozen_teacher(i) for i in range(len(ids))]
        if source == "online":
            members = [Member(tid, 1 / len(ids), teacher) for tid, teacher in zip(ids, frozen)]
            return TeacherSource(members, ids[0], Watchdog(60, 0)), None
        with torch.no_grad():
            probs = torch.stack([teacher(self.images).logits.float().softmax(1) for teacher in frozen], 1)
        members = [Member(tid, 1 / len(ids), replay_slot=i) for i, tid in enumerate(ids)]
        return TeacherSource(members, ids[0], Watchdog(60, 0), outputs_dirs=list(ids)), probs

    def teacher_forward_step(self, index: int = 0):
        """A teacher's own forward at the benchmark batch, exactly as the online KD step calls it."""
        frozen = self.frozen_teacher(index)

        def step():
            frozen(self.images)
        return step

    def hand_written_step(self):
        student, teacher = copy.deepcopy(self.student), copy.deepcopy(self.teacher)
        optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)

        def step():
            with torch.no_grad(), self.autocast():
                teacher_logits = teacher(self.images)
            with self.autocast():
                logits = student(self.images)
            ce = F.cross_entropy(logits.float(), self.targets)
            kl = F.kl_div(F.log_softmax(logits.float() / T, 1), F.log_softmax(teacher_logits.float() / T, 1),
                          reduction="batchmean", log_target=True)
            loss = CE_WEIGHT * ce + KD_WEIGHT * T * T * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def torchdistill_step(self):
        from torch.utils.data import TensorDataset
        from torchdistill.core.distillation import get_distillation_box

        hook = {"input": [], "output": []}
        train_config = {
            "num_epochs": 1,
            "train_data_loader": {"dataset_id": "bench", "kwargs": {"batch_size": self.batch}, "requires_supp": False,
                                  "sampler": {"class_or_func": torch.utils.data.SequentialSampler, "kwargs": {}}},
            "teacher": {"forward_proc": "forward_batch_only", "forward_hook": hook, "requires_grad": False,
                        "wrapper": None, "sequential": []},
            "student": {"forward_proc": "forward_batch_only", "forward_hook": hook, "requires_grad": True,
                        "wrapper": None, "sequential": [], "frozen_modules": [], "adaptations": None},
            "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4}},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"weight": 1.0, "criterion": {
                "key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                            "teacher_module_path": ".", "teacher_module_io": "output",
                                            "temperature": T, "alpha": CE_WEIGHT, "beta": KD_WEIGHT,
                                            "reduction": "batchmean"}}}}}},
        }
        dataset = {"bench": TensorDataset(self.images.cpu(), self.targets.cpu())}
        box = get_distillation_box(copy.deepcopy(self.teacher), copy.deepcopy(self.student), dataset, train_config,
                                   self.device, None, False, 1)
        box.pre_epoch_process(epoch=0)

        def step():
            # Like with like: the same autocast (bf16 on GPU) and channels-last networks and batch as
            # kdscale's and the hand-written steps; the backward (in post_forward_process) outside it.
            with self.autocast():
                loss = box.forward_process(self.images, self.targets)
            box.post_forward_process(loss)
            return loss
        return step


def first_batch_losses(setup: Setup) -> dict[str, float]:
    """The KD loss of kdscale and of torchdistill on the same first batch and weights."""
    cls = get_method_class("kd")
    distiller = cls(copy.deepcopy(setup.student), cls.Params(temperature=T, ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT),
                    MethodContext(setup.num_classes, setup.image_size)).train()
    frozen = setup.frozen_teacher()
    with setup.autocast():
        _, terms = distiller(setup.images, setup.targets, frozen(setup.images))
    out = {"kdscale": float(sum(terms.values()).detach())}
    try:
        out["torchdistill"] = float(setup.torchdistill_step()().detach())
    except ImportError:
        pass
    return out


def bench_compute(setup: Setup, steps: int, rounds: int, peer: bool) -> dict:
    """Throughput of each candidate per round and every ratio per round (median and IQR)."""
    candidates = {
        "hand_written_kd": (setup.hand_written_step(), setup.batch),
        "kdscale_kd_online": (setup.kdscale_step("kd", "online"), setup.batch),
        "kdscale_student_only": (setup.kdscale_step("vanilla", "none"), setup.batch),
        "teacher_forward": (setup.teacher_forward_step(), setup.batch),
        "kdscale_kd_shards": (setup.kdscale_step("kd", "shards"), setup.batch),
    }
    peer_note = None
    if peer:
        try:
            candidates["torchdistill_kd"] = (setup.torchdistill_step(), setup.batch)
        except ImportError:
            peer_note = "torchdistill is not installed (pip install torchdistill==1.1.5)"
    samples = interleaved_rounds(candidates, setup.device, steps, rounds)
    student, online = samples["kdscale_student_only"], samples["kdscale_kd_online"]
    bound = measured_bound(student, [samples["teacher_forward"]])

    def ratio(numerator: str, denominator: str) -> dict:
        return ratio_over_rounds(samples[numerator], samples[denominator])

    ratios = {
        "overhead_kdscale_vs_hand_written": ratio("kdscale_kd_online", "hand_written_kd"),
        "online_kd_vs_student_only": ratio("kdscale_kd_online", "kdscale_student_only"),
        "online_kd_measured_bound": ratio_over_rounds(bound, student),
        "online_kd_fraction_of_bound": ratio_over_rounds(online, bound),
        "shard_kd_vs_student_only": ratio("kdscale_kd_shards", "kdscale_student_only"),
    }
    if "torchdistill_kd" in samples:
        ratios["kdscale_vs_torchdistill"] = ratio("kdscale_kd_online", "torchdistill_kd")
    flops_s = forward_flops(setup.student, setup.image_size, setup.device)
    flops_t = forward_flops(setup.teacher, setup.image_size, setup.device)
    out = {
        "throughput": throughput_summary(samples), "ratios": ratios,
        "flop_model": {"student_forward_gflops": flops_s / 1e9, "teacher_forward_gflops": flops_t / 1e9,
                       "online_kd_vs_student_only": 3 * flops_s / (3 * flops_s + flops_t)},
        "first_batch_loss": first_batch_losses(setup) if peer else {},
    }
    if peer_note:
        out["peer_note"] = peer_note
    return out


def measured_bound(student: list[float], teacher_forwards: list[list[float]]) -> list[float]:
    """Per round, the images/s of a student-only step followed by each teacher's forward, all
    timed in that round (the time per image adds up)."""
    return [1.0 / (1.0 / s + sum(1.0 / t[r] for t in teacher_forwards)) for r, s in enumerate(student)]


def bench_teachers(setup: Setup, steps: int, rounds: int) -> dict:
    """KD from all of ``setup.teachers`` (section ``teachers<N>``), online against its measured
    bound and replayed against student-only, side by side in the same rounds."""
    count = len(setup.teachers)
    candidates = {
        "kdscale_student_only": (setup.kdscale_step("vanilla", "none"), setup.batch),
        f"kdscale_kd_online_{count}_teachers": (setup.kdscale_step("kd", "online", count), setup.batch),
        **{f"teacher_forward_{i}": (setup.teacher_forward_step(i), setup.batch) for i in range(count)},
        f"kdscale_kd_shards_{count}_teachers": (setup.kdscale_step("kd", "shards", count), setup.batch),
    }
    samples = interleaved_rounds(candidates, setup.device, steps, rounds)
    student, online = samples["kdscale_student_only"], samples[f"kdscale_kd_online_{count}_teachers"]
    bound = measured_bound(student, [samples[f"teacher_forward_{i}"] for i in range(count)])
    prefix = f"teachers{count}"
    ratios = {
        f"{prefix}_online_kd_vs_student_only": ratio_over_rounds(online, student),
        f"{prefix}_online_kd_measured_bound": ratio_over_rounds(bound, student),
        f"{prefix}_online_kd_fraction_of_bound": ratio_over_rounds(online, bound),
        f"{prefix}_shard_kd_vs_student_only": ratio_over_rounds(samples[f"kdscale_kd_shards_{count}_teachers"],
                                                                student),
    }
    return {"teachers": count, "throughput": throughput_summary(samples), "ratios": ratios}
