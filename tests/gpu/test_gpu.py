"""The GPU paths, on the device (``gpu`` marker): run by ``bash launch/gpu-check.sh`` on a
machine with CUDA, skipped (and counted as skipped) without one. ``--dry-run`` sets
``KDSCALE_GPU_CHECK_DRY_RUN=1`` and runs the same tests on the CPU at the same tiny sizes, so
the check itself cannot rot. One process: two ranks on one GPU would need gloo, and the
multi-rank paths are covered on CPU by the slow tier."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.common import make_config

from kdscale.models import build_model
from kdscale.train.loop import Trainer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("KDSCALE_GPU_CHECK_DRY_RUN") == "1":
        return torch.device("cpu")
    pytest.skip("no CUDA device (bash launch/gpu-check.sh --dry-run runs these on the CPU)")


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        entry = json.loads(line)
        if "train/loss" in entry:
            out[entry["step"]] = entry["train/loss"]
    return out


def _kd(synth_data, tmp_path, name, *extra):
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        torch.save(build_model("resnet20", 10).state_dict(), teacher)
    return make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "teacher.name=resnet20",
                       f"teacher.weights={teacher}", "data.train_samples=128", "data.batch_size=32",
                       "train.epochs=1", "train.log_every_steps=1", *extra, name=name)


def test_bf16_channels_last_kd_matches_fp32_and_the_export_reloads(device, synth_data, tmp_path):
    """The first 4 steps' losses of bf16 autocast + channels-last within 3% of fp32's (bf16
    keeps 8 bits of mantissa), and the exported student loads into the plain model."""
    fp32 = Trainer(_kd(synth_data, tmp_path, "fp32", "train.precision=fp32", "train.channels_last=false")).train()
    bf16 = Trainer(_kd(synth_data, tmp_path, "bf16", "train.precision=bf16", "train.channels_last=true")).train()
    assert fp32["completed"] and bf16["completed"]
    a, b = _losses(fp32["run_dir"]), _losses(bf16["run_dir"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=0.03), (step, a[step], b[step])
    student = build_model("resnet8", 10, bf16["export"]).to(device).eval()
    with torch.no_grad():
        assert torch.isfinite(student(torch.randn(2, 3, 32, 32, device=device))).all()


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_on_the_device_resumes_exactly(device, synth_data, tmp_path, strategy):
    """DeepSpeed ZeRO-2 and ZeRO-3 trainers on one rank of this device (NCCL on a GPU): 4 steps
    straight, or 2 then a resume, end with the same weights. The ZeRO-3 *frozen teacher* needs
    2 processes, and 2 NCCL ranks cannot share one GPU: it is tested on 2 CPU ranks
    (tests/scaleout/test_zero.py), not here."""
    common = (f"distributed.strategy={strategy}", "train.precision=fp32")
    straight = Trainer(_kd(synth_data, tmp_path, f"straight-{strategy}", *common)).train()
    Trainer(_kd(synth_data, tmp_path, f"resumed-{strategy}", *common, "train.stop_after_steps=2")).train()
    resumed = Trainer(_kd(synth_data, tmp_path, f"resumed-{strategy}", *common)).train()
    assert straight["completed"] and resumed["completed"]
    from safetensors.torch import load_file

    a, b = load_file(straight["export"]), load_file(resumed["export"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crd_banks_live_on_the_device(device):
    from kdscale.methods.contrast_memory import ContrastMemory, ContrastSampler

    memory = ContrastMemory(256, 16, seed=0, device=device)
    sampler = ContrastSampler(torch.arange(256) % 10, "other_class", seed=0)
    v_s = torch.nn.functional.normalize(torch.randn(8, 16, device=device), dim=1).requires_grad_(True)
    v_t = torch.nn.functional.normalize(torch.randn(8, 16, device=device), dim=1)
    loss = memory.contrast_loss(v_s, v_t, torch.arange(8, device=device), sampler, 32, 0.07, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and v_s.grad is not None and v_s.grad.device.type == device.type
    assert memory.student.device.type == memory.teacher.device.type == device.type


def test_device_decode_matches_the_cpu_path_and_replaces_bad_images(device, photo_samples):
    """``data.decode=gpu`` on this device (nvJPEG on a GPU): the CPU path's boxes and flips, pixels
    within 3 of 255 levels per image in mean absolute value (two JPEG decoders' IDCTs and two
    resamplers), and an undecodable image replaced by the next decodable one of its batch."""
    import random

    from kdscale.config.schema import DataSection
    from kdscale.data.device_decode import (
        DeferredDecoder,
        decode_on_device,
        stack_views,
    )
    from kdscale.data.transforms import SampleDecoder

    section = DataSection(augment="imagenet", image_size=96, jpeg_draft=False)
    cpu, deferred = SampleDecoder(section, True), DeferredDecoder(section)
    encoded = [deferred(s["jpg"], random.Random(i)) for i, s in enumerate(photo_samples[:8])]
    expected = torch.stack([cpu(s["jpg"], random.Random(i)) for i, s in enumerate(photo_samples[:8])])
    views, undecodable = decode_on_device(stack_views(encoded), section, device)
    assert undecodable == [] and views.device.type == device.type and views.shape == (8, 3, 96, 96)
    levels = torch.tensor(section.std).view(3, 1, 1) * 255
    per_image = [((a - b) * levels).abs().mean().item() for a, b in zip(views.cpu(), expected)]
    assert max(per_image) < 3, per_image
    broken = encoded[1].data.clone()
    broken[len(broken) // 3:] = 0
    encoded[1] = encoded[1]._replace(data=broken)
    views, undecodable = decode_on_device(stack_views(encoded[:4]), section, device)
    good, _ = decode_on_device(stack_views([encoded[2]]), section, device)
    assert undecodable == [1] and torch.equal(views[1], good[0])


def test_compiled_networks_and_teacher_match_eager_on_the_device(device, synth_data, tmp_path):
    """``train.compile=all`` (the trained networks and the frozen teacher) on the device: the
    first 4 steps' losses within 0.2% of eager. On the CPU ``tests/gpu/test_compile.py`` covers it."""
    if device.type != "cuda":
        pytest.skip("compiling on the CPU is tests/gpu/test_compile.py's (slow tier)")
    eager = Trainer(_kd(synth_data, tmp_path, "eager", "train.precision=fp32", "train.stop_after_steps=4")).train()
    compiled = Trainer(_kd(synth_data, tmp_path, "compiled", "train.precision=fp32", "train.stop_after_steps=4",
                           "train.compile=all")).train()
    a, b = _losses(eager["run_dir"]), _losses(compiled["run_dir"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-3), step


def test_step_agreement_on_the_device(device):
    """The ranks' finite/stop agreement read one micro-step late (``train.nonfinite=stop``): on a
    GPU through a pinned host copy behind an event; the verdict answers for the step that asked."""
    from kdscale.parallel.context import DistContext
    from kdscale.train.agreement import StepAgreement

    agreement = StepAgreement(DistContext.from_env(), deferred=True)
    assert agreement.exchange(torch.tensor(float("inf"), device=device), 0, "one") is None
    verdict = agreement.exchange(torch.tensor(1.0, device=device), 1, "two")
    assert (verdict.nonfinite, verdict.stop, verdict.where) == (True, 0, "one")
    last = agreement.settle()
    assert (last.nonfinite, last.stop, last.where) == (False, 1, "two")


def test_teach_on_the_device_replays_into_a_run(device, synth_data, tmp_path):
    """``kdscale.teach`` on this device (bf16 autocast on a GPU) stores the top-5 probabilities
    the teacher gives on each stored crop (within bf16 and fp16 rounding: 5e-3), and a run
    replays them."""
    import io

    from helpers.common import base_overrides
    from PIL import Image

    from kdscale.data.loader import _samples_of
    from kdscale.data.shards import expand_shards
    from kdscale.data.teacher_outputs import decode_record, replay_crop
    from kdscale.teach.__main__ import main as teach_main

    torch.manual_seed(0)
    teacher = build_model("resnet8", 10).eval()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    outputs = str(tmp_path / "outputs")
    summary = teach_main(base_overrides(synth_data, str(tmp_path), name="teach") + [
        "method.name=kd", "student.name=resnet8", "teacher.name=resnet8", f"teacher.weights={tmp_path / 'teacher.pt'}",
        "data.augment=imagenet", f"teacher.outputs={outputs}", "teacher.crops_per_image=1", "teacher.top_k=5"])
    assert summary["shards_written"] == 8
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    shard = expand_shards(f"{synth_data}/train-*.tar", "k")[0]
    images = {s["__key__"]: s["jpg"] for s in _samples_of([shard])}
    for record in list(_samples_of([os.path.join(outputs, os.path.basename(shard))]))[:8]:
        arrays = decode_record(record)
        image = Image.open(io.BytesIO(images[record["__key__"]])).convert("RGB")
        view = (replay_crop(image, arrays["crops"][0], bool(arrays["flips"][0]), 32).float() / 255 - mean) / std
        with torch.no_grad():
            probs = torch.softmax(teacher(view[None]), dim=1)[0]
        classes = torch.from_numpy(arrays["classes"][0].astype("int64"))
        stored = torch.from_numpy(arrays["probs"][0].astype("float32"))
        assert torch.allclose(probs[classes], stored, atol=5e-3), (probs[classes], stored)
    replay = Trainer(make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8",
                                 "teacher.source=shards", f"teacher.outputs={outputs}", "data.augment=imagenet",
                                 "train.stop_after_steps=4", "train.log_every_steps=1", name="replay")).train()
    losses = _losses(replay["run_dir"])
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())


def test_features_bf16_matches_fp32_on_the_device(device, synth_data, tmp_path):
    """The ``features`` method on this device: a timm ViT teacher (its own grid and width) and a
    CNN teacher, PHI-S statistics gathered on the device, k-NN validation; the first 4 steps'
    losses under bf16 autocast + channels-last within 5% of fp32's, every metric finite."""
    import math

    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10).state_dict(), tmp_path / "cnn.pt")
    common = ["method.name=features", "student.name=resnet8", "method.standardize=phi-s",
              "method.standardize_batches=2", "data.train_samples=128", "data.batch_size=32", "train.epochs=1",
              "train.log_every_steps=1", f"data.knn_memory_shards={synth_data}/train-000000.tar",
              "data.knn_memory_samples=128",
              f"teachers=[{{id: cnn, name: resnet20, weights: {tmp_path / 'cnn.pt'}, targets: [summary, spatial]}}, "
              "{id: vit, name: 'timm:test_vit', timm_options: {img_size: 32, patch_size: 8}, "
              "targets: [summary, spatial]}]"]
    fp32 = Trainer(make_config(synth_data, str(tmp_path), *common, "train.precision=fp32",
                               "train.channels_last=false", name="features-fp32")).train()
    bf16 = Trainer(make_config(synth_data, str(tmp_path), *common, "train.precision=bf16",
                               "train.channels_last=true", name="features-bf16")).train()
    assert fp32["completed"] and bf16["completed"]
    a, b = _losses(fp32["run_dir"]), _losses(bf16["run_dir"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=0.05), (step, a[step], b[step])
    for name in ("val/student_knn_top1", "val/cnn_knn_top1", "val/vit_knn_top1", "val/cosine_vit_spatial"):
        assert math.isfinite(bf16["metrics"][name]), name
