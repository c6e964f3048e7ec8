"""Shards and loaders: round trip, equal batch counts per rank, exact validation, resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kdscale.config.schema import DataSection
from kdscale.data.loader import (
    TrainStream,
    ValStream,
    _samples_of,
    check_shard_count,
    make_loader,
)
from kdscale.data.shards import expand_shards, samples_from_index
from kdscale.errors import KdscaleError


def data_section(synth_data, **kw) -> DataSection:
    base = dict(train_shards=f"{synth_data}/train-*.tar", val_shards=f"{synth_data}/val-*.tar", num_classes=10,
                batch_size=16, num_workers=2, shuffle_buffer=64)
    return DataSection(**{**base, **kw})


def test_synthetic_shards_and_index(synth_data):
    index = json.load(open(os.path.join(synth_data, "index.json")))
    train = expand_shards(f"{synth_data}/{index['splits']['train']['pattern']}", "data.train_shards")
    assert [os.path.basename(p) for p in train] == index["splits"]["train"]["shards"]
    assert samples_from_index(train, "train") == 1600
    assert samples_from_index(train[:3], "train") is None  # a subset: the count does not apply
    samples = list(_samples_of(train))
    assert len(samples) == 1600 and len({s["__key__"] for s in samples}) == 1600
    labels = [int(s["cls"]) for s in samples]
    assert set(labels) == set(range(10))
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)  # JPEG-encoded


def test_train_stream_equal_counts_and_disjoint_ranks(synth_data):
    data = data_section(synth_data)
    shards = expand_shards(data.train_shards, "k")
    per_rank = []
    for rank in range(2):
        stream = TrainStream(shards, data, seed=0, epoch=0, rank=rank, world_size=2, batches_per_rank=7)
        batches = list(make_loader(stream, data, pin_memory=False))
        assert len(batches) == 7 and all(b[0].shape == (16, 3, 32, 32) for b in batches)
        per_rank.append({k for b in batches for k in b[2]})
    assert not per_rank[0] & per_rank[1]  # ranks read different shards


@pytest.mark.parametrize("skip", [1, 4, 5])
def test_resumed_stream_equals_uninterrupted(synth_data, skip):
    data = data_section(synth_data)
    shards = expand_shards(data.train_shards, "k")

    def batches(skip_batches):
        stream = TrainStream(shards, data, seed=3, epoch=1, rank=1, world_size=2, batches_per_rank=9,
                             skip_batches=skip_batches)
        return list(make_loader(stream, data, pin_memory=False))

    full, resumed = batches(0), batches(skip)
    assert len(resumed) == 9 - skip
    for a, b in zip(full[skip:], resumed):
        assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_epoch = TrainStream(shards, data, seed=3, epoch=2, rank=1, world_size=2, batches_per_rank=9)
    assert next(iter(make_loader(other_epoch, data, pin_memory=False)))[2] != full[0][2]


def test_validation_scores_every_sample_exactly_once(synth_data):
    data = data_section(synth_data, batch_size=24)
    shards = expand_shards(data.val_shards, "k")
    keys = []
    for rank in range(2):
        stream = ValStream(shards, data, rank=rank, world_size=2)
        keys += [k for batch in make_loader(stream, data, pin_memory=False) for k in batch.keys]
    assert len(keys) == 400 and len(set(keys)) == 400


def test_shard_errors(synth_data, tmp_path):
    with pytest.raises(KdscaleError, match=r"data.train_shards='.*/nothing-\*.tar' matches no file"):
        expand_shards(f"{tmp_path}/nothing-*.tar", "data.train_shards")
    with pytest.raises(KdscaleError, match=r"1 of 9 shards are missing, e.g. .*train-000008.tar"):
        expand_shards(f"{synth_data}/train-{{000000..000008}}.tar", "data.train_shards")
    with pytest.raises(KdscaleError, match="8 shards for 4 processes x 3 workers; .* at least 12 shards"):
        check_shard_count(expand_shards(f"{synth_data}/train-*.tar", "k"), "data.train_shards", 4, 3)


def _write_bad_shards(tmp_path, synth_data):
    """A good shard with 3 bad samples, plus a truncated copy of a good shard."""
    import io

    import webdataset as wds
    from PIL import Image

    good = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good, format="JPEG")
    path = str(tmp_path / "bad-000000.tar")
    with wds.TarWriter(path) as sink:
        for i in range(6):
            sink.write({"__key__": f"ok{i}", "jpg": good.getvalue(), "cls": "1"})
        sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8 not really a jpeg", "cls": "1"})
        sink.write({"__key__": "nolabel", "jpg": good.getvalue()})
        sink.write({"__key__": "outofrange", "jpg": good.getvalue(), "cls": "12"})
    truncated = str(tmp_path / "bad-000001.tar")
    data = open(os.path.join(synth_data, "val-000000.tar"), "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2 + 100])
    return [path, truncated]


def test_bad_samples_are_skipped_counted_and_named(synth_data, tmp_path, capfd):
    shards = _write_bad_shards(tmp_path, synth_data)
    data = DataSection(val_shards=" ", num_classes=10, num_workers=0, batch_size=8)
    batches = list(ValStream(shards, data, rank=0, world_size=1))
    keys = [k for b in batches for k in b.keys]
    assert sorted(k for k in keys if k.startswith("ok")) == [f"ok{i}" for i in range(6)]
    assert not {"corrupt", "nolabel", "outofrange"} & set(keys)
    assert 90 < len(keys) - 6 < 110  # the readable part of the truncated 200-sample shard
    assert sum(b.bad_samples for b in batches) == 4  # three bad samples and the truncated tar
    err = capfd.readouterr().err
    for fragment in ("sample corrupt in ", "cannot decode the image", "sample nolabel in ", "no label (.cls)",
                     "label 12 outside data.num_classes=10", "truncated inside a"):
        assert fragment in err, fragment


def test_too_many_bad_samples_stop_with_a_clear_error(synth_data, tmp_path):
    shards = _write_bad_shards(tmp_path, synth_data)
    data = DataSection(num_classes=10, num_workers=0, batch_size=8, max_bad_samples=2)
    with pytest.raises(KdscaleError, match=r"more than data.max_bad_samples=2 bad samples .*kdscale shards verify"):
        list(ValStream(shards, data, rank=0, world_size=1))
    train = TrainStream(shards, DataSection(num_classes=10, num_workers=0, batch_size=4, shuffle_buffer=1,
                                            max_bad_samples=50), seed=0, epoch=0, rank=0, world_size=1,
                        batches_per_rank=20)
    batches = list(train)
    assert len(batches) == 20 and all(b.images.shape[0] == 4 for b in batches)
    assert sum(b.bad_samples for b in batches) == 3  # once each in the epoch, though the worker cycles


def test_resume_past_an_undecodable_image_is_exact(synth_data, tmp_path):
    """A corrupt JPEG inside the batches a resumed run skips (undecoded): every later batch
    is still the uninterrupted run's, because the replacement comes from the same batch."""
    import webdataset as wds

    from kdscale.data.tar_reader import iter_samples

    shards = []
    for i, source in enumerate(sorted(expand_shards(f"{synth_data}/train-*.tar", "k"))[:2]):
        shards.append(str(tmp_path / f"corrupt-{i:06d}.tar"))
        with wds.TarWriter(shards[-1]) as sink:
            for n, sample in enumerate(iter_samples(source)):
                jpg = b"\xff\xd8 truncated" if n in (7, 60) else sample["jpg"]
                sink.write({"__key__": sample["__key__"], "jpg": jpg, "cls": sample["cls"]})
    data = DataSection(num_classes=10, num_workers=0, batch_size=8, shuffle_buffer=16)

    def batches(skip):
        return list(TrainStream(shards, data, seed=5, epoch=0, epochs=2, rank=0, world_size=1, batches_per_rank=30,
                                skip_batches=skip))

    full = batches(0)
    replaced = [i for i, b in enumerate(full[:30]) if len(set(b.keys)) < len(b.keys)]
    assert replaced and sum(b.bad_samples for b in full[:30]) == len(replaced) == 3  # each once, replaced once
    skip = replaced[-1] + 1
    resumed = batches(skip)
    assert len(resumed) == 60 - skip
    for a, b in zip(full[skip:], resumed):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
