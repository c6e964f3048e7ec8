"""Model zoo: torchvision nets by name, hook-based feature taps, weights through files."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kdscale.checkpoints import save_checkpoint
from kdscale.errors import KdscaleError
from kdscale.models import FeatureTaps, build_model


def test_torchvision_model_by_name():
    model = build_model("torchvision:resnet18", num_classes=7).eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_feature_taps_on_torchvision_and_cifar_nets():
    resnet = build_model("torchvision:resnet18", 10).eval()
    taps = FeatureTaps(resnet, ["layer2", "layer4", "layer4.1.conv2"])
    with torch.no_grad():
        resnet(torch.zeros(2, 3, 64, 64))
    feats = taps.pop()
    assert feats["layer2"].shape == (2, 128, 8, 8)
    assert feats["layer4"].shape == (2, 512, 2, 2)
    assert feats["layer4.1.conv2"].shape == (2, 512, 2, 2)
    assert taps.pop() == {}
    wrn = build_model("wrn_40_2", 100).eval()
    taps = FeatureTaps(wrn, ["block3"])
    with torch.no_grad():
        wrn(torch.zeros(1, 3, 32, 32))
    assert taps.pop()["block3"].shape == (1, 128, 8, 8)
    taps.remove()
    with torch.no_grad():
        wrn(torch.zeros(1, 3, 32, 32))
    assert taps.features == {}


def test_feature_tap_on_missing_layer_lists_valid_ones():
    with pytest.raises(KdscaleError, match=r"has no layer 'layer9'; valid top-level layers: conv1, bn1, relu, layer1"):
        FeatureTaps(build_model("resnet20", 10), ["layer9"], where="teacher")


def test_unknown_model_name_suggests():
    with pytest.raises(KdscaleError, match=r"unknown model 'resnet8x5'; did you mean .*resnet8x4"):
        build_model("resnet8x5", 10)
    with pytest.raises(KdscaleError, match=r"unknown model 'torchvision:resnet19'; did you mean .*torchvision:resnet18"):
        build_model("torchvision:resnet19", 10)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_round_trip_through_files(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet8", 10)
    for module in source.modules():  # make BN buffers non-default so they are checked too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_()
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, wrapped)
    safe = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(safe))
    ckpt = save_checkpoint(str(tmp_path / "run"), {"model": {"student." + k: v for k, v in source.state_dict().items()}
                                                   | {"kbm." + k: v for k, v in source.state_dict().items()}}, 5, 2)
    for spec in (plain, wrapped, safe, ckpt, ckpt + "#kbm"):
        loaded = build_model("resnet8", 10, str(spec))
        assert _same_weights(source, loaded), spec
        assert not _same_weights(build_model("resnet8", 10), loaded)  # a fresh model differs
    with pytest.raises(KdscaleError, match=r"checkpoint has no network 'peer'; it holds kbm, student"):
        build_model("resnet8", 10, ckpt + "#peer")


def test_wrong_architecture_names_mismatched_keys(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(build_model("resnet20", 10).state_dict(), path)
    with pytest.raises(KdscaleError) as err:
        build_model("resnet8", 10, str(path), where="teacher")
    assert "teacher.weights=" in str(err.value) and "unexpected: layer1.1.conv1.weight" in str(err.value)
    with pytest.raises(KdscaleError, match=r"shape mismatch: fc.weight \(10, 64\) vs model \(100, 64\)"):
        build_model("resnet20", 100, str(path))
    with pytest.raises(KdscaleError, match="weights file not found: .*missing.pt"):
        build_model("resnet20", 10, str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(KdscaleError, match=r"cannot read .*junk.pt: not a torch.save file"):
        build_model("resnet20", 10, str(junk))


def test_torchvision_weight_enum_loads_through_torchvision_cache(tmp_path, monkeypatch):
    """The real torchvision loading path, fed from its local cache so no network is used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / enum.url.rsplit("/", 1)[1])
    model = build_model("torchvision:resnet18", 1000, "torchvision:IMAGENET1K_V1")
    assert _same_weights(reference, model)
    with pytest.raises(KdscaleError, match="have 1000 classes but teacher is built with 10; set teacher.num_classes=1000"):
        build_model("torchvision:resnet18", 10, "torchvision:DEFAULT", where="teacher")
    with pytest.raises(KdscaleError, match="no weights 'IMAGENET9'; choose DEFAULT or one of IMAGENET1K_V1"):
        build_model("torchvision:resnet18", 1000, "torchvision:IMAGENET9")
    with pytest.raises(KdscaleError, match="torchvision weights exist only for torchvision"):
        build_model("resnet8", 10, "torchvision:DEFAULT")


class _InPlaceAfter(torch.nn.Module):
    """``bn`` followed by an in-place ReLU, as in WRN and torchvision blocks."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(x)).mean()


def test_a_tap_changed_in_place_is_refused_or_copied():
    """Tapping ``bn`` would hand over the ReLU's output: the student's taps refuse it by name,
    the frozen teacher's (copy=True) keep the values ``bn`` returned (negatives included)."""
    from kdscale.errors import KdscaleError
    from kdscale.models.features import FeatureTaps

    net, images = _InPlaceAfter(), torch.randn(2, 3, 4, 4)
    taps = FeatureTaps(net, ["bn"], where="student")
    net(images)
    with pytest.raises(KdscaleError, match="student layer 'bn': an in-place operation that follows it"):
        taps.pop()
    taps.remove()
    copied = FeatureTaps(net, ["bn"], where="teacher", copy=True)
    with torch.inference_mode():
        net(images)
    assert copied.pop()["bn"].min() < 0
