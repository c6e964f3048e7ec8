"""timm models as students, teachers, DML peers and scratch teachers; their weights from a
file and from timm's own hub loader fed by a local Hugging Face cache; a frozen teacher's
own view (mean, std, input size) derived on the device, checked against an independent
computation; the identity view leaves today's behaviour bit for bit.

timm 1.0.31's test models (``test_resnet``, ``test_convnext``: 0.2-0.4 M parameters, with a
pretrained tag ``r160_in1k`` at 160 px and mean = std = 0.5) keep this fast."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torchvision.transforms.functional as TF
from helpers.common import PYTHON, ROOT, make_config, run_cli
from safetensors.torch import save_file

from kdscale.config import load_config
from kdscale.errors import KdscaleError
from kdscale.models import FeatureTaps, build_model
from kdscale.models.features import residual_stages
from kdscale.models.preprocessing import network_preprocessing
from kdscale.teachers.frozen import FrozenTeacher
from kdscale.teachers.views import teacher_view

DATA_MEAN, DATA_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TAG = "test_resnet.r160_in1k"


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def write_hf_cache(cache, model) -> None:
    """``model``'s weights where huggingface_hub keeps ``timm/test_resnet.r160_in1k``'s
    ``model.safetensors``: ``models--<org>--<name>/snapshots/<commit>/`` with
    ``refs/main`` naming the commit (huggingface_hub's cache layout)."""
    repo = cache / f"models--timm--{TAG}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))


# -- names, weights ----------------------------------------------------------------------
def test_timm_names_build_and_say_what_is_wrong():
    model = build_model("timm:test_resnet", 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("timm:test_resnet.r160_in1k", 7).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    cases = [
        (("timm:test_resnett",), r"timm has no model 'test_resnett'; did you mean timm:test_resnet"),
        (("timm:test_resnet.r999",), r"teacher.name: timm model test_resnet has no pretrained tag 'r999'"),
        (("timm:test_resnet", "timm:nope"), r"no pretrained tag 'nope'; choose DEFAULT or one of r160_in1k"),
        (("timm:resnet18.a1_in1k", "timm:a2_in1k"), r"contradicts the tag in the name \(resnet18.a1_in1k\)"),
        (("timm:test_mambaout", "timm:DEFAULT"), r"timm has no pretrained weights for test_mambaout"),
        (("resnet8", "timm:DEFAULT"), r"timm weights exist only for timm:\* models"),
        (("timm:test_resnet", "torchvision:DEFAULT"), r"torchvision weights exist only for torchvision:\* models"),
        (("timm:test_resnet", "timm:DEFAULT"), r"have 1000 classes but teacher is built with 10; timm would replace "
                                               r"the classifier with a random one. Set teacher.num_classes=1000"),
        (("resnet18",), r"did you mean .*timm:resnet18"),
    ]
    for args, message in cases:
        with pytest.raises(KdscaleError, match=message):
            build_model(args[0], 10, *args[1:], where="teacher")


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = build_model("timm:test_convnext", 10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for path in ("w.pth", "w.safetensors"):
        assert _same_weights(source, build_model("timm:test_convnext", 10, str(tmp_path / path)))
    with pytest.raises(KdscaleError, match=r"weights do not fit the model .*head.fc.weight"):
        build_model("timm:test_convnext", 5, str(tmp_path / "w.pth"))


def test_hub_weights_load_through_timm_from_its_local_cache(tmp_path, monkeypatch):
    """timm.create_model(pretrained=True) -> huggingface_hub.hf_hub_download, offline, from
    the cache directory (set here as HF_HUB_CACHE / HF_HUB_OFFLINE=1 would at import)."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    torch.manual_seed(2)
    reference = build_model("timm:test_resnet", 1000)
    with pytest.raises(KdscaleError, match=r"timm could not load test_resnet.r160_in1k .*HF_HUB_OFFLINE=1"):
        build_model("timm:test_resnet", 1000, "timm:DEFAULT", where="teacher")
    write_hf_cache(tmp_path / "hub", reference)
    for name, weights in (("timm:test_resnet", "timm:DEFAULT"), ("timm:test_resnet", "timm:r160_in1k"),
                          ("timm:test_resnet.r160_in1k", "timm:DEFAULT")):
        assert _same_weights(reference, build_model(name, 1000, weights, where="teacher")), (name, weights)
    with pytest.warns(UserWarning, match="timm keeps the backbone and initialises a new classifier"):
        student = build_model("timm:test_resnet", 10, "timm:DEFAULT", where="student")
    backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in backbone.items())
    assert student.fc.out_features == 10


@pytest.mark.slow
def test_hub_weights_from_the_cache_named_by_environment_variables(tmp_path):
    """The same, as a user sets it up: a fresh process with HF_HUB_CACHE and HF_HUB_OFFLINE=1."""
    torch.manual_seed(2)
    reference = build_model("timm:test_resnet", 1000)
    write_hf_cache(tmp_path / "hub", reference)
    torch.save(reference.state_dict(), tmp_path / "reference.pt")
    code = ("import torch; from kdscale.models import build_model; "
            "m = build_model('timm:test_resnet', 1000, 'timm:DEFAULT', where='teacher'); "
            f"ref = torch.load({str(tmp_path / 'reference.pt')!r}); "
            "print('same' if all(torch.equal(v, m.state_dict()[k]) for k, v in ref.items()) else 'differ')")
    result = run_cli([PYTHON, "-c", code], {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr


# -- features and stages -----------------------------------------------------------------
def test_feature_taps_and_default_stages_on_timm_models():
    resnet, convnext = build_model("timm:test_resnet", 10), build_model("timm:test_convnext", 10)
    assert residual_stages(resnet, "k") == ["layer1", "layer2", "layer3", "layer4"]
    assert residual_stages(convnext, "k") == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert residual_stages(build_model("timm:test_efficientnet", 10), "k") == ["blocks.1", "blocks.2", "blocks.3",
                                                                                "blocks.4"]
    taps = FeatureTaps(convnext, ["stages.1", "stages.3.blocks.0"], where="teacher")
    convnext.eval()(torch.zeros(2, 3, 64, 64))
    assert {k: tuple(v.shape[:2]) for k, v in taps.pop().items()} == {"stages.1": (2, 32), "stages.3.blocks.0": (2, 64)}
    with pytest.raises(KdscaleError, match=r"method.teacher_layers: cannot tell the residual stages of "
                                           r"VisionTransformer; set method.teacher_layers to a list of layers"):
        residual_stages(build_model("timm:test_vit", 10), "method.teacher_layers")


def test_timm_dml_peers_ctkd_scratch_teacher_and_at_defaults():
    from kdscale.runtime.device import Runtime
    from kdscale.train.setup import build_distiller

    runtime = Runtime(torch.device("cpu"), None, False)
    common = ["student.name=timm:test_resnet", "data.num_classes=10", "wandb.mode=disabled"]
    dml, _ = build_distiller(load_config(None, common + ["method.name=dml", "method.peers=[timm:test_convnext]"]),
                             runtime)
    assert type(dml.peers[0]).__name__ == "ConvNeXt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # teacher.weights not set
        ctkd, frozen = build_distiller(load_config(None, common + [
            "method.name=ctkd", "teacher.name=timm:test_resnet", "method.scratch_teacher=timm:test_resnet"]),
            runtime)
        at, _ = build_distiller(load_config(None, common + ["method.name=at", "teacher.name=timm:test_convnext"]),
                                runtime)
    assert type(ctkd.scratch_teacher).__name__ == "ResNet" and ctkd.shared_stem
    assert ctkd.teacher_needs().features == ("layer1", "layer2", "layer3", "layer4")
    assert frozen["teacher"].taps is not None and at.teacher_needs().features == ("stages.0", "stages.1", "stages.2",
                                                                         "stages.3")


# -- the teacher's view ------------------------------------------------------------------
def _teacher_input(frozen: FrozenTeacher, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = frozen.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        frozen(images)
    finally:
        handle.remove()
    return seen[0]


def test_preprocessing_defaults_come_from_the_weights_then_the_data():
    def resolved(*extra):
        cfg = load_config(None, ["data.image_size=32", *extra])
        p = network_preprocessing(cfg.data, cfg.teachers[0])
        return p.mean, p.std, p.input_size

    data = (tuple(DATA_MEAN), tuple(DATA_STD), (32, 32))
    assert resolved("teacher.name=timm:test_resnet") == data  # random init: the data's
    assert resolved("teacher.name=timm:test_resnet", "teacher.weights=/some/file.pt") == data  # a file: no metadata
    assert resolved("teacher.name=timm:test_resnet", "teacher.weights=timm:DEFAULT") == ((0.5,) * 3, (0.5,) * 3,
                                                                                        (160, 160))
    assert resolved("teacher.name=torchvision:vit_h_14", "teacher.weights=torchvision:DEFAULT")[2] == (518, 518)
    assert resolved("teacher.name=timm:test_resnet", "teacher.weights=timm:DEFAULT", "teacher.input_size=40",
                    "teacher.std=[1,1,1]") == ((0.5,) * 3, (1.0,) * 3, (40, 40))
    with pytest.raises(KdscaleError, match=r"teacher.mean: expected 3 values \(one per RGB channel\), got 2"):
        resolved("teacher.name=resnet8", "teacher.mean=[0.5,0.5]")


@pytest.mark.parametrize("size", [96, 48, 64])
def test_a_teacher_with_other_mean_std_and_size_sees_its_own_view(size):
    """The teacher's input equals un-normalise -> resize (bilinear, antialiased) ->
    normalise, computed here with torchvision's functional ops; the student's batch is untouched."""
    cfg = load_config(None, ["data.image_size=64", "teacher.name=timm:test_convnext", "teacher.mean=[0.5,0.4,0.3]",
                             "teacher.std=[0.25,0.3,0.35]", f"teacher.input_size={size}"])
    view = teacher_view(cfg.data, cfg.teachers[0])
    frozen = FrozenTeacher(build_model("timm:test_convnext", 10), [], torch.device("cpu"), None, False, view=view)
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 64, 64)
    images = TF.normalize(pixels, DATA_MEAN, DATA_STD)
    before = images.clone()
    seen = _teacher_input(frozen, images)
    unnormalised = images * torch.tensor(DATA_STD).view(1, 3, 1, 1) + torch.tensor(DATA_MEAN).view(1, 3, 1, 1)
    resized = TF.resize(unnormalised, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    expected = TF.normalize(resized, [0.5, 0.4, 0.3], [0.25, 0.3, 0.35])
    assert seen.shape == (4, 3, size, size) and seen.dtype == torch.float32
    torch.testing.assert_close(seen, expected, atol=2e-6, rtol=0)
    assert torch.equal(images, before)
    # channels-last in, channels-last out (the GPU path); the same values
    seen_cl = _teacher_input(frozen, images.contiguous(memory_format=torch.channels_last))
    assert seen_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(seen_cl, expected, atol=2e-6, rtol=0)


def test_the_identity_view_is_bit_identical_to_no_view():
    cfg = load_config(None, ["data.image_size=32", "teacher.name=timm:test_resnet", f"teacher.mean={DATA_MEAN}",
                             "teacher.input_size=32"])
    view = teacher_view(cfg.data, cfg.teachers[0])
    assert view.identity
    torch.manual_seed(0)
    model = build_model("timm:test_resnet", 10)
    images = torch.randn(3, 3, 32, 32)
    assert view(images) is images
    plain = FrozenTeacher(model, ["layer2"], torch.device("cpu"), None, False)
    viewed = FrozenTeacher(model, ["layer2"], torch.device("cpu"), None, False, view=view)
    assert _teacher_input(viewed, images) is images
    a, b = plain(images), viewed(images)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features["layer2"], b.features["layer2"])


def test_only_a_frozen_teacher_gets_a_view():
    from kdscale.lifecycle.watchdog import Watchdog
    from kdscale.train.teacher_source import teacher_source

    cfg = load_config(None, ["method.name=prokt", "teacher.name=resnet8", "teacher.input_size=64"])
    with pytest.warns(UserWarning, match=r"teacher.input_size ignored: only a frozen teacher has its own view"):
        teacher_source(cfg, None, Watchdog(60, 0))
    cfg = load_config(None, ["method.name=kd", "teacher.name=resnet8", "teacher.input_size=64"])
    frozen = FrozenTeacher(build_model("resnet8", 10), [], torch.device("cpu"), None, False)
    assert teacher_source(cfg, {"teacher": frozen}, Watchdog(60, 0)).frozen.view.target.input_size == (64, 64)


def test_teacher_output_shards_record_and_use_the_teachers_preprocessing(tmp_path):
    from kdscale.data.shards import expand_shards
    from kdscale.data.synth import write_synthetic_shards
    from kdscale.data.tar_reader import iter_samples
    from kdscale.data.teacher_outputs import META_FILE, decode_record
    from kdscale.teach.run import teach

    data = str(tmp_path / "data")
    write_synthetic_shards(data, num_classes=10, train_samples=16, val_samples=8, image_size=32,
                           samples_per_shard=8, seed=3, progress=False)
    torch.manual_seed(0)
    torch.save(build_model("timm:test_resnet", 10).state_dict(), tmp_path / "t.pt")
    outputs = str(tmp_path / "out")
    cfg = make_config(data, str(tmp_path), "method.name=kd", "student.name=resnet8", "teacher.name=timm:test_resnet",
                      f"teacher.weights={tmp_path / 't.pt'}", "data.augment=imagenet", f"teacher.outputs={outputs}",
                      "teacher.crops_per_image=2", "teacher.top_k=3", "teacher.input_size=48",
                      "teacher.mean=[0.5,0.5,0.5]", "teacher.std=[0.5,0.5,0.5]", name="teach")
    assert teach(cfg)["samples_written"] == 16
    meta = json.load(open(os.path.join(outputs, META_FILE)))
    assert meta["teacher_preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [48, 48],
                                             "from": "teacher.mean, teacher.std, teacher.input_size"}
    # the stored probabilities are the teacher's on its own view of the stored crop
    import io

    from PIL import Image

    from kdscale.data.teacher_outputs import replay_crop

    model = build_model("timm:test_resnet", 10, str(tmp_path / "t.pt")).eval()
    shard = expand_shards(f"{data}/train-*.tar", "k")[0]
    sample = next(iter_samples(shard))
    record = decode_record(next(iter_samples(os.path.join(outputs, os.path.basename(shard)))))
    image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    crop = replay_crop(image, record["crops"][0], bool(record["flips"][0]), 32).float().div(255)
    teacher_input = TF.normalize(TF.resize(crop, [48, 48], antialias=True), [0.5] * 3, [0.5] * 3)
    with torch.inference_mode():
        probs = torch.softmax(model(teacher_input[None]), 1)[0]
    top = probs.topk(3)
    assert torch.equal(torch.tensor(record["classes"][0]).long(), top.indices)
    torch.testing.assert_close(torch.tensor(record["probs"][0]).float(), top.values, atol=1e-3, rtol=0)


# -- training ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_timm_student_learns_from_a_timm_teacher_with_its_own_view(synth_data, tmp_path):
    """A tiny run: timm student at the data's 32 px, a timm teacher (weights from a file) at
    48 px with its own mean/std; the teacher really sees 48-px inputs in training and validation."""
    from kdscale.train.loop import Trainer

    torch.manual_seed(0)
    teacher_file = str(tmp_path / "teacher.safetensors")
    save_file({k: v.contiguous() for k, v in build_model("timm:test_convnext", 10).state_dict().items()},
              teacher_file)
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=timm:test_resnet",
                      "teacher.name=timm:test_convnext", f"teacher.weights={teacher_file}", "teacher.input_size=48",
                      "teacher.mean=[0.5,0.5,0.5]", "teacher.std=[0.5,0.5,0.5]", "data.train_samples=320",
                      "train.epochs=2", name="timm-kd")
    trainer = Trainer(cfg)
    sizes = set()
    trainer.teacher.frozen.model.register_forward_pre_hook(lambda _m, args: sizes.add(tuple(args[0].shape[-2:])))
    summary = trainer.train()
    assert summary["completed"] and summary["step"] == 2 * (320 // 32)
    assert sizes == {(48, 48)}
    metrics = summary["metrics"]
    assert {"val/student_top1", "val/teacher_top1", "val/agreement_top1"} <= set(metrics)
    lines = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    losses = [entry["train/loss"] for entry in lines if "train/loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.slow
def test_attention_transfer_between_timm_nets_at_two_resolutions(synth_data, tmp_path):
    """AT with default layers (timm ResNet stages vs timm ConvNeXt stages) while the teacher
    sees 64 px and the student 32 px: the attention maps are resized to match (losses.py)."""
    from kdscale.train.loop import Trainer

    torch.manual_seed(0)
    teacher_file = str(tmp_path / "teacher.pt")
    torch.save(build_model("timm:test_convnext", 10).state_dict(), teacher_file)
    cfg = make_config(synth_data, str(tmp_path), "method.name=at", "student.name=timm:test_resnet",
                      "teacher.name=timm:test_convnext", f"teacher.weights={teacher_file}", "teacher.input_size=64",
                      "data.train_samples=160", name="timm-at")
    summary = Trainer(cfg).train()
    lines = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    at_terms = [entry["train/loss_at"] for entry in lines if "train/loss_at" in entry]
    assert summary["completed"] and at_terms and all(torch.isfinite(torch.tensor(at_terms)))


def test_a_fixed_size_teacher_is_checked_at_its_own_input_size(synth_data, tmp_path):
    """A ViT accepts only its own resolution: the start-up class check runs it there, not at
    the student's size (it used to stop with timm's input-size assertion)."""
    from kdscale.runtime.device import Runtime
    from kdscale.train.setup import build_distiller

    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8",
                      "teacher.name=timm:test_vit3", "teacher.input_size=160")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distiller, frozen = build_distiller(cfg, Runtime.from_config(cfg, torch.device("cpu")))
    assert distiller is not None and set(frozen) == {"teacher"}
