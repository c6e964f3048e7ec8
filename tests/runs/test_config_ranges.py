"""Range checks: every count, size, period, rate and temperature is checked while the
config loads, and an unreadable weights file of any format is one line, exit code 2."""

from __future__ import annotations

import dataclasses
import os
import types
import typing

import pytest
import torch
from helpers.common import PYTHON, base_overrides, run_cli

from kdscale.config import load_config
from kdscale.config.schema import ExperimentConfig
from kdscale.errors import KdscaleError
from kdscale.methods import METHODS
from kdscale.models import build_model, read_state_dict

# key -> the allowed range; "kd:method.temperature" is method kd's parameter.
RANGES = {
    "student.num_classes": ">=1", "teacher.num_classes": ">=1",
    "teacher.crops_per_image": ">=1", "teacher.top_k": ">=1", "teacher.input_size": ">=1", "teacher.weight": ">0",
    "data.num_classes": ">=1", "data.train_samples": ">=1", "data.image_size": ">=1", "data.val_resize": ">=1",
    "data.std": ">0", "data.batch_size": ">=1", "data.num_workers": ">=0", "data.shuffle_buffer": ">=1",
    "data.mixup_alpha": ">=0", "data.cutmix_alpha": ">=0", "data.mix_prob": "[0,1]",
    "data.mix_switch_prob": "[0,1]", "data.max_bad_samples": ">=0", "data.loader_timeout_s": ">0",
    "optim.lr": ">0", "optim.momentum": "[0,1)", "optim.weight_decay": ">=0", "optim.betas": "[0,1)",
    "optim.milestones": ">=0", "optim.gamma": ">0", "optim.warmup_epochs": ">=0", "optim.min_lr": ">=0",
    "train.epochs": ">=1", "train.grad_accum_steps": ">=1", "train.clip_grad_norm": ">0",
    "train.label_smoothing": "[0,1)", "train.log_every_steps": ">=1", "train.eval_every_epochs": ">=1",
    "train.checkpoint_every_steps": ">=0", "train.keep_checkpoints": ">=1", "train.stop_after_steps": ">=1",
    "train.preempt_check_steps": ">=1", "train.stall_timeout_s": ">0", "train.max_nonfinite_skips": ">=1",
    "distributed.timeout_s": ">=1", "wandb.init_timeout_s": ">0",
    "at:method.beta": ">=0", "at:method.ce_weight": ">=0",
    "ctkd:method.gamma": ">=0", "ctkd:method.temperature": ">0", "ctkd:method.beta": ">=0",
    "ctkd:method.ce_weight": ">=0", "ctkd:method.scratch_ce_weight": ">=0",
    "dml:method.temperature": ">0", "dml:method.ce_weight": ">=0", "dml:method.kl_weight": ">=0",
    "ffcl:method.temperature": ">0", "ffcl:method.ce_weight": ">=0", "ffcl:method.fused_weight": ">=0",
    "ffcl:method.ensemble_weight": ">=0", "ffcl:method.rampup_epochs": ">=0",
    "ffcl:method.fusion_weight_decay": ">=0", "ffcl:method.mutual_weight": ">=0", "ffcl:method.at_beta": ">=0",
    "ffcl:method.pk_weight": ">=0", "ffcl:method.pk_correct_prob": "[0,1]",
    "kd:method.temperature": ">0", "kd:method.ce_weight": ">=0", "kd:method.kd_weight": ">=0",
    "prokt:method.lam": "[0,1]", "prokt:method.temperature": ">0", "prokt:method.kl_weight": ">=0",
    "prokt:method.ce_weight": ">=0", "prokt:method.teacher_lr_scale": ">=0", "prokt:method.dual_eps": ">=0",
    "prokt:method.dual_lr": ">=0", "prokt:method.dual_beta0": ">=0",
    "sokd:method.temperature": ">0", "sokd:method.ce_weight": ">=0", "sokd:method.kd_weight": ">=0",
    "sokd:method.kbm_ce_weight": ">=0", "sokd:method.kbm_teacher_weight": ">=0",
    "sokd:method.kbm_student_weight": ">=0",
    "data.knn_memory_samples": ">=1",
    "features:method.summary_weight": ">=0", "features:method.spatial_weight": ">=0",
    "features:method.cosine_weight": ">=0", "features:method.smooth_l1_weight": ">=0", "features:method.hidden": ">=1",
    "features:method.inner": ">=0", "features:method.ce_weight": ">=0", "features:method.kd_weight": ">=0",
    "features:method.temperature": ">0", "features:method.standardize_batches": ">=1",
    "dkd:method.ce_weight": ">=0", "dkd:method.alpha": ">=0", "dkd:method.beta": ">=0",
    "dkd:method.temperature": ">0", "dkd:method.warmup": ">=0",
    "dist:method.ce_weight": ">=0", "dist:method.kd_weight": ">=0", "dist:method.beta": ">=0",
    "dist:method.gamma": ">=0", "dist:method.tau": ">0",
    "fitnet:method.beta": ">=0", "fitnet:method.ce_weight": ">=0", "fitnet:method.kd_weight": ">=0",
    "fitnet:method.temperature": ">0", "fitnet:method.hint_epochs": ">=0",
    "rkd:method.distance_weight": ">=0", "rkd:method.angle_weight": ">=0", "rkd:method.ce_weight": ">=0",
    "rkd:method.kd_weight": ">=0", "rkd:method.temperature": ">0",
    "pkt:method.beta": ">=0", "pkt:method.ce_weight": ">=0", "pkt:method.kd_weight": ">=0",
    "pkt:method.temperature": ">0", "pkt:method.eps": ">0",
    "sp:method.beta": ">=0", "sp:method.ce_weight": ">=0", "sp:method.kd_weight": ">=0",
    "sp:method.temperature": ">0",
    "reviewkd:method.ce_weight": ">=0", "reviewkd:method.review_weight": ">=0",
    "reviewkd:method.warmup_epochs": ">=0", "reviewkd:method.mid_channels": ">=0",
    "reviewkd:method.kd_weight": ">=0", "reviewkd:method.temperature": ">0",
    "crd:method.beta": ">=0", "crd:method.ce_weight": ">=0", "crd:method.kd_weight": ">=0",
    "crd:method.temperature": ">0", "crd:method.feat_dim": ">=1", "crd:method.nce_k": ">=1", "crd:method.nce_t": ">0",
    "crd:method.nce_m": "[0,1]",
    "deit:method.alpha": "[0,1]", "deit:method.tau": ">0",
}
# Numbers with no range: any value is meaningful.
UNCHECKED = {"experiment.seed", "data.mean"}
LIST_KEYS = {"data.std", "optim.betas", "optim.milestones"}
WORDS = {">=1": "must be >= 1", ">0": "must be > 0", ">=0": "must be >= 0",
         "[0,1]": "must be in [0, 1]", "[0,1)": "must be in [0, 1)"}
BAD = {">=1": ["0", "-1"], ">0": ["0", "-1", "-0.5"], ">=0": ["-1", "-0.5"],
       "[0,1]": ["-0.1", "1.5"], "[0,1)": ["-0.1", "1"]}
EDGE = {">=1": "1", ">0": "0.001", ">=0": "0", "[0,1]": "1", "[0,1)": "0"}


def overrides(spec: str, value: str) -> tuple[list[str], str]:
    """Overrides that set the key of ``spec`` to ``value``, and the key as the error shows it."""
    method, _, key = spec.rpartition(":")
    extra = [f"method.name={method}"] if method else []
    if key.startswith("teacher."):
        extra.append("teacher.name=resnet20")
    if key in LIST_KEYS:
        return extra + [f"{key}=[0.5, {value}]"], f"{key}[1]"
    return extra + [f"{key}={value}"], key


def numeric_fields(cls: type, prefix: str = ""):
    """(key, int or float, field metadata) of every number in a config dataclass, nested ones too."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        wrapped = typing.get_origin(hint) in (list, typing.Union, types.UnionType)
        base = [a for a in typing.get_args(hint) if a is not type(None)][0] if wrapped else hint
        if dataclasses.is_dataclass(base):
            yield from numeric_fields(base, f"{prefix}{f.name}.")
        elif base in (int, float):
            yield f"{prefix}{f.name}", base, f.metadata


# ``teachers`` entries are the ``teacher`` section's dataclass: checked once, as ``teacher.*``
# (tests/runs/test_several_teachers.py checks that a list entry's range names ``teachers[i]``).
FIELDS = {key: (kind, meta) for key, kind, meta in numeric_fields(ExperimentConfig) if not key.startswith("teachers.")}
for _name, _cls in METHODS.items():
    FIELDS.update((f"{_name}:method.{key}", (kind, meta)) for key, kind, meta in numeric_fields(_cls.Params))
CASES = [(spec, value) for spec, rng in RANGES.items() for value in BAD[rng]
         if not ("." in value and FIELDS[spec][0] is int)]


@pytest.mark.parametrize("spec, value", CASES, ids=[f"{s}={v}" for s, v in CASES])
def test_out_of_range_value_is_one_line_naming_key_value_and_range(spec, value):
    args, shown = overrides(spec, value)
    with pytest.raises(KdscaleError) as err:
        load_config(None, args)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"command-line override {shown}={value}: {WORDS[RANGES[spec]]}"), message


@pytest.mark.parametrize("spec", list(RANGES))
def test_edge_of_range_is_accepted(spec):
    args, _ = overrides(spec, EDGE[RANGES[spec]])
    load_config(None, args)


@pytest.mark.parametrize("value", [".nan", "inf", "-.inf"])
def test_non_finite_numbers_are_out_of_range(value):
    with pytest.raises(KdscaleError, match=r"optim\.lr=.*: must be a finite number > 0 \(the peak learning rate\)"):
        load_config(None, [f"optim.lr={value}"])


def test_message_names_what_the_key_is_and_null_where_allowed():
    with pytest.raises(KdscaleError) as err:
        load_config(None, ["data.batch_size=0"])
    assert str(err.value) == "command-line override data.batch_size=0: must be >= 1 (the per-process batch size)"
    with pytest.raises(KdscaleError, match=r"train\.clip_grad_norm=0: must be > 0 or null \("):
        load_config(None, ["train.clip_grad_norm=0"])
    cfg = load_config(None, ["train.clip_grad_norm=null", "train.stop_after_steps=null", "data.train_samples=null"])
    assert cfg.train.clip_grad_norm is None and cfg.train.stop_after_steps is None


def test_out_of_range_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("method: {name: kd, temperature: 0}\n")
    with pytest.raises(KdscaleError, match=r"exp\.yaml: method\.temperature=0: must be > 0$"):
        load_config(str(path))
    path.write_text("train:\n  grad_accum_steps: 0\n")
    with pytest.raises(KdscaleError, match=r"exp\.yaml: train\.grad_accum_steps=0: must be >= 1"):
        load_config(str(path))


def test_new_fault_handling_keys_and_defaults():
    cfg = load_config(None, [])
    assert cfg.train.stall_timeout_s == 900.0 and isinstance(cfg.train.stall_timeout_s, float)
    assert cfg.train.nonfinite == "stop" and cfg.train.max_nonfinite_skips == 10
    assert cfg.data.loader_timeout_s == 600.0
    cfg = load_config(None, ["train.nonfinite=skip", "train.max_nonfinite_skips=3", "train.stall_timeout_s=30"])
    assert (cfg.train.nonfinite, cfg.train.max_nonfinite_skips, cfg.train.stall_timeout_s) == ("skip", 3, 30.0)
    with pytest.raises(KdscaleError, match=r"train\.nonfinite: 'ignore' is not one of 'stop', 'skip'"):
        load_config(None, ["train.nonfinite=ignore"])


def test_every_number_in_the_schema_and_method_params_has_a_range():
    """A new count, size or rate without a declared range (or a range without a test) fails here."""
    assert "teacher.top_k" in FIELDS and "kd:method.temperature" in FIELDS  # the walk reaches them
    unranged = sorted(k for k, (_, meta) in FIELDS.items() if not meta and k not in UNCHECKED)
    assert not unranged, f"numbers without a range: {unranged}"
    untested = sorted(k for k, (_, meta) in FIELDS.items() if meta and k not in RANGES)
    assert not untested, f"ranges without a test here: {untested}"


# -- through the real entry point ------------------------------------------------------
def _one_line(result, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("kdscale: error: ") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["data.batch_size=0"], "data.batch_size=0: must be >= 1 (the per-process batch size)"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps=0: must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    (["method.name=kd", "method.temperature=0"], "method.temperature=0: must be > 0"),
], ids=["batch_size", "grad_accum_steps", "num_workers", "temperature"])
def test_entry_point_rejects_out_of_range_before_starting(args, fragment, tmp_path):
    data = str(tmp_path / "no-data")  # never read: the config is rejected first
    result = run_cli([PYTHON, "-m", "kdscale.train", *base_overrides(data, str(tmp_path)), *args])
    _one_line(result, fragment)
    assert not os.path.exists(tmp_path / "run"), "nothing may start before the config is valid"


# -- unreadable weights ------------------------------------------------------------------
GARBAGE = b"this is not a weights file, just some text\n" * 20


def _bad_weight_files(tmp_path) -> dict[str, str]:
    """Unreadable weights files of each format: name -> path."""
    from safetensors.torch import save_file

    state = build_model("resnet8", 10).state_dict()
    good_st, good_pt = tmp_path / "good.safetensors", tmp_path / "good.pt"
    save_file(state, str(good_st))
    torch.save(state, good_pt)
    files = {
        "garbage.safetensors": GARBAGE, "garbage.pt": GARBAGE, "empty.pt": b"", "empty.safetensors": b"",
        "truncated.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "truncated.pt": good_pt.read_bytes()[: good_pt.stat().st_size // 2],
        "header_only.safetensors": good_st.read_bytes()[:12],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "truncated_legacy.pt").write_bytes(legacy.read_bytes()[:1000])
    return {name: str(tmp_path / name) for name in [*files, "truncated_legacy.pt"]}


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pt", "empty.pt", "empty.safetensors",
                                  "truncated.safetensors", "truncated.pt", "header_only.safetensors",
                                  "truncated_legacy.pt"])
def test_unreadable_weights_file_is_one_clear_line(name, tmp_path):
    path = _bad_weight_files(tmp_path)[name]
    with pytest.raises(KdscaleError) as err:
        build_model("resnet8", 10, path, where="teacher")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"teacher.weights: cannot read {path}: "), message
    assert "point teacher.weights at" in message, message


def test_weights_with_the_wrong_extension_say_to_rename(tmp_path):
    from safetensors.torch import save_file

    state = build_model("resnet8", 10).state_dict()
    save_file(state, str(tmp_path / "st.pt"))
    torch.save(state, tmp_path / "pt.safetensors")
    with pytest.raises(KdscaleError, match=r"st\.pt: it is a safetensors file: rename it to end in \.safetensors"):
        read_state_dict(str(tmp_path / "st.pt"), "student.weights")
    with pytest.raises(KdscaleError, match=r"pt\.safetensors: it is a torch\.save file, not safetensors: rename"):
        read_state_dict(str(tmp_path / "pt.safetensors"), "student.weights")


def test_pickled_objects_are_refused_by_name(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"w": torch.zeros(2), "opt": _Opaque()}, path)
    with pytest.raises(KdscaleError, match=r"objects\.pt: it holds Python objects .*_Opaque\); save only tensors"):
        read_state_dict(str(path), "teacher.weights")


class _Opaque:
    """A class a weights-only load refuses."""


@pytest.mark.parametrize("key, name", [
    ("student.weights", "garbage.safetensors"),
    ("teacher.weights", "garbage.pt"),
    ("teacher.weights", "truncated.pt"),
    ("student.weights", "truncated.safetensors"),
])
def test_entry_point_unreadable_weights(key, name, synth_data, tmp_path):
    os.makedirs(tmp_path / "w")
    path = _bad_weight_files(tmp_path / "w")[name]
    if key == "teacher.weights":
        args = ["method.name=kd", "student.name=resnet8", "teacher.name=resnet8", f"teacher.weights={path}"]
    else:
        args = ["method.name=vanilla", "student.name=resnet8", f"student.weights={path}"]
    result = run_cli([PYTHON, "-m", "kdscale.train", *base_overrides(synth_data, str(tmp_path / "out")), *args])
    _one_line(result, f"{key}: cannot read {path}: ")
