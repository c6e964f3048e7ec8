"""The batched teacher-output writer against the per-image writer it replaced (a reference
written here from the record format), with loader workers, and its stop paths: a stop
mid-shard keeps a resumable partial, and the rerun writes the same companion bytes as a
write that never stopped; SIGUSR1 to a real ``python -m kdscale.teach`` exits 0, SIGTERM
143, and neither leaves a corrupt companion."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from helpers.common import PYTHON, ROOT, make_config
from PIL import Image

from kdscale.data.loader import DECODE_ERRORS, BadSample, parse_sample
from kdscale.data.shards import expand_shards
from kdscale.data.tar_reader import iter_samples
from kdscale.data.teacher_outputs import crop_boxes, decode_record, replay_crop
from kdscale.models import build_model

R, K = 3, 5
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """6 shards of 16 32x32 JPEGs, and a 7th holding an undecodable image and an unlabelled one."""
    import webdataset as wds

    from kdscale.data.synth import write_synthetic_shards

    out = str(tmp_path_factory.mktemp("teach-data"))
    write_synthetic_shards(out, num_classes=10, train_samples=96, val_samples=16, image_size=32,
                           samples_per_shard=16, seed=3, progress=False)
    good = list(iter_samples(os.path.join(out, "train-000000.tar")))[:5]
    with wds.TarWriter(os.path.join(out, "train-000006.tar")) as sink:
        for i, sample in enumerate(good):
            fields = {"jpg": sample["jpg"], "cls": sample["cls"]}
            if i == 1:
                fields["jpg"] = b"not a jpeg"
            if i == 3:
                del fields["cls"]
            sink.write({"__key__": f"bad{i:03d}", **fields})
    return out


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """resnet8 with random weights and BN statistics, so that its outputs vary per crop."""
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    path = str(tmp_path_factory.mktemp("teach-teacher") / "teacher.pt")
    torch.save(model.state_dict(), path)
    return path


def teach_config(data_dir, outputs, teacher, *extra):
    return make_config(data_dir, os.path.dirname(outputs), "method.name=kd", "student.name=resnet8",
                       "teacher.name=resnet8", f"teacher.weights={teacher}", "data.augment=imagenet",
                       f"teacher.outputs={outputs}", f"teacher.crops_per_image={R}", f"teacher.top_k={K}",
                       "experiment.seed=7", *extra, name="teach")


def per_image_records(shard: str, model, seed: int = 7, size: int = 32) -> list[tuple]:
    """The writer before batching: decode one image, one teacher forward on its R crops."""
    records = []
    for sample in iter_samples(shard):
        key = sample["__key__"]
        try:
            _key, jpeg, _label = parse_sample(sample, 10)
            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
            boxes, flips = crop_boxes(key, image.width, image.height, R, seed)
            views = torch.stack([TF.normalize(replay_crop(image, box, bool(flip), size).float().div_(255), MEAN, STD)
                                 for box, flip in zip(boxes, flips)])
            with torch.inference_mode():
                top = torch.softmax(model(views).float(), dim=1).topk(K, dim=1)
            records.append((key, boxes, flips, top.values.half().numpy(), top.indices.int().numpy()))
        except (BadSample, *DECODE_ERRORS):
            records.append((key, np.zeros((0, 4), np.float32), np.zeros(0, np.uint8), np.zeros((0, K), np.float16),
                            np.zeros((0, K), np.int32)))
    return records


def assert_same_as_reference(data_dir: str, outputs: str, teacher_path: str, seed: int = 7,
                             shards: slice = slice(None)) -> None:
    """Every record of the companions of ``shards`` equals the per-image writer's: the same
    keys, crops and flips, probabilities to fp16 rounding (classes may swap on near-ties)."""
    model = build_model("resnet8", 10, teacher_path).eval()
    for shard in expand_shards(f"{data_dir}/train-*.tar", "k")[shards]:
        written = list(iter_samples(os.path.join(outputs, os.path.basename(shard))))
        expected = per_image_records(shard, model, seed)
        assert [r["__key__"] for r in written] == [e[0] for e in expected], shard
        for record, (key, boxes, flips, probs, classes) in zip(written, expected):
            arrays = decode_record(record)
            assert np.array_equal(arrays["crops"], boxes) and np.array_equal(arrays["flips"], flips), key
            assert arrays["probs"].shape == probs.shape and arrays["classes"].shape == classes.shape, key
            stored = arrays["probs"].astype(np.float32)
            np.testing.assert_allclose(stored, probs.astype(np.float32), atol=1e-3, rtol=0, err_msg=key)  # fp16
            swapped = arrays["classes"] != classes  # only near-ties may swap places
            assert np.all(np.abs(stored - probs.astype(np.float32))[swapped] <= 1e-3), key


def companions(outputs: str) -> dict[str, bytes]:
    return {n: open(os.path.join(outputs, n), "rb").read() for n in sorted(os.listdir(outputs)) if n.endswith(".tar")}


@pytest.mark.parametrize("batch", [7, 32])
def test_batched_writer_equals_the_per_image_writer(small_data, teacher_file, tmp_path, batch):
    from kdscale.teach.run import teach

    outputs = str(tmp_path / "out")
    summary = teach(teach_config(small_data, outputs, teacher_file, f"data.batch_size={batch}"))
    assert summary["shards_written"] == 7 and summary["samples_written"] == 101 and summary["exit_code"] == 0
    assert summary["samples_without_crops"] == 2
    assert_same_as_reference(small_data, outputs, teacher_file)
    assert not [n for n in os.listdir(outputs) if n.endswith((".tmp", ".partial"))]


class StopAfter:
    """A stand-in for :class:`StopSignals` (inside the job's :class:`JobStop`) that reports SIGUSR1
    from its ``n``-th look on."""

    def __init__(self, n: int):
        self.n, self.looks = n, 0

    @property
    def received(self):
        self.looks += 1
        return signal.SIGUSR1 if self.looks >= self.n else None


def test_a_stop_mid_shard_keeps_a_partial_the_rerun_continues(small_data, teacher_file, tmp_path):
    from kdscale.lifecycle.job import JobStop
    from kdscale.parallel.context import DistContext
    from kdscale.teach.writer import TeacherOutputWriter

    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    TeacherOutputWriter(teach_config(small_data, whole, teacher_file, "data.batch_size=12"), ctx).run()
    cfg = teach_config(small_data, resumed, teacher_file, "data.batch_size=12")  # 4 images per chunk
    # Looks: one before the loader, then one per chunk (4, and an end marker, per shard of 16);
    # the chunk in flight is written before stopping.
    first = TeacherOutputWriter(cfg, ctx, stop=JobStop(StopAfter(8), None)).run()
    assert first["ranks_stopped"] == 1 and first["shards_written"] == 1 and first["shards_partial"] == 1
    assert sorted(os.listdir(resumed)) == ["teacher_outputs.json", "train-000000.tar", "train-000001.tar.partial"]
    partial = list(iter_samples(os.path.join(resumed, "train-000001.tar.partial")))
    assert len(partial) == 8  # whole chunks only
    second = TeacherOutputWriter(cfg, ctx, stop=JobStop(StopAfter(3), None)).run()  # stops again, inside the same shard
    assert second["shards_written"] == 0 and second["shards_partial"] == 1 and second["samples_written"] == 8
    assert len(list(iter_samples(os.path.join(resumed, "train-000001.tar.partial")))) == 16
    third = TeacherOutputWriter(cfg, ctx).run()
    assert third["shards_reused"] == 1 and third["shards_written"] == 6 and third["samples_written"] == 101 - 32
    assert companions(resumed) == companions(whole)  # byte for byte
    assert not [n for n in os.listdir(resumed) if n.endswith((".tmp", ".partial"))]


def test_the_preemption_file_stops_before_any_work(small_data, teacher_file, tmp_path):
    from kdscale.teach.run import teach

    flag = tmp_path / "preempt"
    flag.touch()
    summary = teach(teach_config(small_data, str(tmp_path / "out"), teacher_file, f"train.preempt_file={flag}"))
    assert summary["ranks_stopped"] == 1 and summary["shards_written"] == 0 and summary["exit_code"] == 0


def test_outputs_written_with_other_settings_are_refused(small_data, teacher_file, tmp_path):
    """A rerun reuses finished companions, so one with another crops_per_image (or top_k, seed,
    teacher...) must not add to them: one line names what differs, before any work."""
    from kdscale.errors import KdscaleError
    from kdscale.teach.run import teach

    outputs = str(tmp_path / "out")
    flag = tmp_path / "preempt"
    flag.touch()  # writes the metadata, then stops before any shard
    teach(teach_config(small_data, outputs, teacher_file, f"train.preempt_file={flag}"))
    with pytest.raises(KdscaleError, match=r"crops_per_image 3 there, 5 now.*another teacher\.outputs"):
        teach(teach_config(small_data, outputs, teacher_file, "teacher.crops_per_image=5"))
    with pytest.raises(KdscaleError, match=r"seed 7 there, 8 now"):
        teach(teach_config(small_data, outputs, teacher_file, "experiment.seed=8"))
    assert teach(teach_config(small_data, outputs, teacher_file, f"train.preempt_file={flag}"))["exit_code"] == 0


def test_a_second_job_on_the_same_outputs_is_refused(small_data, teacher_file, tmp_path):
    """Two kdscale.teach jobs on one teacher.outputs would write the same companions: the
    second is refused at once, naming the first (the lock is the kernel's, as for runs)."""
    from kdscale.errors import KdscaleError
    from kdscale.lifecycle.run_lock import RunLock
    from kdscale.teach.run import teach

    outputs = str(tmp_path / "out")
    first = RunLock(outputs).acquire(what="kdscale.teach job")  # the other job, holding the directory
    try:
        with pytest.raises(KdscaleError, match=r"in use by another kdscale\.teach job \(pid \d+ .*teacher\.outputs"):
            teach(teach_config(small_data, outputs, teacher_file))
        assert not [n for n in os.listdir(outputs) if n.endswith(".tar")]
    finally:
        first.release()


@pytest.mark.slow
def test_loader_workers_write_what_the_per_image_writer_wrote(small_data, teacher_file, tmp_path):
    from kdscale.teach.run import teach

    outputs = str(tmp_path / "out")
    summary = teach(teach_config(small_data, outputs, teacher_file, "data.num_workers=2", "data.batch_size=10"))
    assert summary["shards_written"] == 7 and summary["samples_written"] == 101
    assert_same_as_reference(small_data, outputs, teacher_file)


def run_teach(args: list[str], log_path, stop_with: int | None = None, when: str = ".tar.tmp") -> int:
    """``python -m kdscale.teach``; with ``stop_with``, that signal goes to it as soon as a
    file ending in ``when`` appears among the outputs (a companion shard being written: not
    ``teacher_outputs.json.tmp``, which comes before any shard, so a stop there leaves none
    partly written)."""
    outputs = next(a.split("=", 1)[1] for a in args if a.startswith("teacher.outputs="))
    job = subprocess.Popen([PYTHON, "-m", "kdscale.teach", *args], cwd=ROOT, stdout=open(log_path, "w"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while stop_with is not None and job.poll() is None and time.monotonic() < deadline:
            if os.path.isdir(outputs) and any(n.endswith(when) for n in os.listdir(outputs)):
                job.send_signal(stop_with)
                break
            time.sleep(0.02)
        return job.wait(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


@pytest.mark.slow
def test_signals_stop_a_real_write_that_then_resumes_to_the_same_shards(small_data, teacher_file, tmp_path):
    from helpers.common import base_overrides

    def args(outputs):
        return base_overrides(small_data, str(tmp_path), name="teach") + [
            "method.name=kd", "student.name=resnet8", "teacher.name=resnet8", f"teacher.weights={teacher_file}",
            "data.augment=imagenet", f"teacher.outputs={outputs}", f"teacher.crops_per_image={R}",
            f"teacher.top_k={K}", "experiment.seed=7", "data.num_workers=2", "data.batch_size=3"]

    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    assert run_teach(args(whole), tmp_path / "whole.log") == 0
    assert run_teach(args(resumed), tmp_path / "usr1.log", signal.SIGUSR1) == 0, open(tmp_path / "usr1.log").read()
    log = open(tmp_path / "usr1.log").read()
    assert "SIGUSR1 received" in log and "run the same command again" in log
    names = os.listdir(resumed)
    assert any(n.endswith(".partial") for n in names) and not any(n.endswith(".tmp") for n in names)
    for name, data in companions(resumed).items():  # whatever was completed is complete
        assert data == companions(whole)[name]
    assert run_teach(args(resumed), tmp_path / "term.log", signal.SIGTERM) == 128 + signal.SIGTERM
    assert run_teach(args(resumed), tmp_path / "rest.log") == 0
    assert companions(resumed) == companions(whole)
    assert not [n for n in os.listdir(resumed) if n.endswith((".tmp", ".partial"))]
    shutil.rmtree(resumed)


@pytest.mark.slow  # a benchmark run
def test_writer_bench_reports_a_ratio_per_round(small_data, tmp_path):
    from kdscale.bench.writer_bench import bench_writer

    result = bench_writer(small_data, str(tmp_path), teacher="resnet8", image_size=32, batch=8, num_classes=10,
                          device="cpu", workers=0, rounds=3, crops=R, top_k=K, shards=2, warmup=0)
    ratio = result["ratios"]["writer_vs_teacher_inference"]
    assert set(ratio) == {"median", "q25", "q75", "iqr", "rounds"} and len(ratio["rounds"]) == 3
    speed = result["throughput"]
    assert ratio["rounds"] == pytest.approx([w / t for w, t in zip(speed["writer"]["rounds"],
                                                                    speed["teacher_inference"]["rounds"])])
    assert result["images"] == 32 and result["crops_per_forward"] == 9 and result["forwards"] == 12
    assert not os.path.exists(tmp_path / "writer-bench-outputs")
