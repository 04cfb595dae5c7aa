"""ViewedDataset, Collate and build_loader: seeded views, skipped samples, padding, seeded order."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data.formats.base import DetectionSource
from detkd.data.images import read_image
from detkd.data.loader import Batch, Collate, ViewedDataset, build_loader, set_epoch
from detkd.data.sample import ImageRecord
from detkd.data.views import View, ViewPolicy, apply_view

SIZES = [(40, 60), (64, 48), (30, 30), (50, 70)]
POLICY = ViewPolicy(sizes=(48, 64, 80), flip_prob=0.5)


class TinySource(DetectionSource):
    """In-memory records over PNGs written to a temporary directory."""

    format_name = "tiny"


def _source(tmp_path, n: int = 12, broken: tuple[int, ...] = ()) -> TinySource:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        path = tmp_path / f"{i:03d}.png"
        if i in broken:
            path.write_bytes(b"this is not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        boxes = torch.tensor([[1.0, 2.0, w / 2, h / 2], [w / 4, h / 3, w - 1.0, h - 0.5]])
        labels = torch.tensor([i % 3 + 1, 2])
        records.append(ImageRecord(image_id=100 + i, file=path, height=h, width=w, boxes=boxes, labels=labels))
    return TinySource(records, ["a", "b", "c"])


@pytest.fixture
def source(tmp_path):
    return _source(tmp_path)


def _views(ds: ViewedDataset, order=None) -> list[View]:
    order = range(len(ds)) if order is None else order
    return {i: ds.view_for(i) for i in order}


def test_view_depends_only_on_seed_epoch_index(source):
    a = ViewedDataset(source, POLICY, train=True, seed=7)
    b = ViewedDataset(source, POLICY, train=True, seed=7)
    assert _views(a) == _views(b, order=reversed(range(len(b))))  # access order does not matter
    first = _views(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert _views(a) == _views(b)
    assert _views(a) != first  # a new epoch draws new views ...
    a.set_epoch(0)
    assert _views(a) == first  # ... and going back replays the old ones
    other_seed = ViewedDataset(source, POLICY, train=True, seed=8)
    assert _views(other_seed) != first
    assert set(first.values()) <= set(POLICY.all_views())
    assert len(set(first.values())) >= 3


def test_eval_mode_always_uses_eval_view(source):
    ds = ViewedDataset(source, POLICY, train=False, seed=7)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert set(_views(ds).values()) == {View(size=80, flip=False)}
        s = ds[epoch]
        assert s.view == POLICY.eval_view() and max(s.image.shape[1:]) == 80


def test_sample_is_the_view_of_the_decoded_image(source):
    ds = ViewedDataset(source, POLICY, train=True, seed=3)
    ds.set_epoch(2)
    for i in (0, 1, 5):
        s = ds[i]
        record = source.records[i]
        image, boxes = apply_view(read_image(record.file), record.boxes, s.view)
        assert s.view == ds.view_for(i)
        assert torch.equal(s.image, image) and torch.equal(s.boxes, boxes)
        assert torch.equal(s.labels, record.labels) and s.labels is not record.labels
        assert (s.image_id, s.orig_size, s.index) == (100 + i, SIZES[i % 4], i)
        assert s.knowledge is None


def test_view_and_knowledge_providers(source):
    seen = []

    def view_provider(record, rng):
        seen.append(record.image_id)
        return View(size=32, flip=record.image_id % 2 == 1)

    def knowledge_provider(image_id, view):
        return {"id": torch.tensor(image_id), "key": view.key}

    ds = ViewedDataset(source, POLICY, train=False, view_provider=view_provider, knowledge_provider=knowledge_provider)
    s = ds[3]
    assert seen == [103] and s.view == View(size=32, flip=True)
    assert s.knowledge["key"] == "s32-flip" and s.knowledge["id"].item() == 103
    batch = Collate(POLICY.canvas)([ds[0], ds[1]])
    assert [k["key"] for k in batch.knowledge] == ["s32", "s32-flip"]


def test_undecodable_image_is_skipped_and_counted(tmp_path, caplog):
    source = _source(tmp_path, n=6, broken=(2,))
    ds = ViewedDataset(source, POLICY, train=True)
    with caplog.at_level(logging.WARNING, logger="detkd.data.loader"):
        assert ds[2] is None
    assert "002.png" in caplog.text and "skipped" in caplog.text
    batch = Collate(POLICY.canvas)([ds[1], ds[2], ds[3]])
    assert batch.skipped == 1 and batch.image_ids == [101, 103] and batch.indices == [1, 3]

    loader = build_loader(ds, batch_size=4, shuffle=True, seed=0)
    batches = list(loader)
    assert sum(b.skipped for b in batches) == 1
    assert sorted(i for b in batches for i in b.image_ids) == [100, 101, 103, 104, 105]


def test_all_skipped_batch_is_empty(tmp_path):
    ds = ViewedDataset(_source(tmp_path, n=2, broken=(0, 1)), POLICY, train=True)
    batch = Collate(64)([ds[0], ds[1]])
    assert len(batch) == 0 and batch.skipped == 2 and batch.images.shape == (0, 3, 64, 64)


def test_collate_pads_top_left_with_zeros(source):
    ds = ViewedDataset(source, POLICY, train=True, seed=1)
    items = [ds[i] for i in (0, 1, 2)]
    batch = Collate(96)(items)
    assert batch.images.shape == (3, 3, 96, 96) and batch.images.dtype == torch.float32
    for k, s in enumerate(items):
        h, w = s.image.shape[1:]
        assert batch.image_sizes[k] == (h, w) == s.view.output_size(*s.orig_size)
        assert torch.equal(batch.images[k, :, :h, :w], s.image)
        pad = batch.images[k].clone()
        pad[:, :h, :w] = 0
        assert not pad.any()  # everything right of and below the image is zero
        assert torch.equal(batch.targets[k]["boxes"], s.boxes)
        assert torch.equal(batch.targets[k]["labels"], s.labels)
    assert batch.image_ids == [100, 101, 102] and batch.indices == [0, 1, 2]
    assert batch.views == [s.view for s in items] and batch.orig_sizes == SIZES[:3]
    assert batch.skipped == 0 and batch.knowledge is None and len(batch) == 3
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images)
    assert torch.equal(moved.targets[1]["boxes"], batch.targets[1]["boxes"])


def test_collate_rejects_views_larger_than_canvas(source):
    s = ViewedDataset(source, ViewPolicy(sizes=(80,)), train=False)[0]
    with pytest.raises(ValueError, match="canvas"):
        Collate(64)([s])


def _order(loader) -> list[int]:
    return [i for b in loader for i in b.indices]


def test_loader_order_depends_only_on_seed_and_epoch(source):
    def make(seed):
        return build_loader(ViewedDataset(source, POLICY, train=True, seed=seed), batch_size=5, shuffle=True, seed=seed)

    a, b = make(4), make(4)
    first = _order(a)
    assert sorted(first) == list(range(12)) and first != list(range(12))
    assert _order(b) == first and _order(a) == first  # re-iterating does not reshuffle
    views0 = [v for batch in a for v in batch.views]
    set_epoch(a, 1)
    set_epoch(b, 1)
    second = _order(a)
    assert second != first and _order(b) == second
    assert [v for batch in a for v in batch.views] != views0  # set_epoch reaches the dataset too
    assert a.dataset.epoch == 1 and a.sampler.epoch == 1
    set_epoch(a, 0)
    assert _order(a) == first
    # torch seeds with seed + epoch; (seed 4, epoch 1) must not replay (seed 5, epoch 0)
    assert _order(make(5)) != second
    assert _order(make(5)) != first


def test_loader_without_shuffle_keeps_order_and_batches(source):
    loader = build_loader(ViewedDataset(source, POLICY, train=False), batch_size=5, shuffle=False)
    batches = list(loader)
    assert [b.indices for b in batches] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert all(b.images.shape[-1] == POLICY.canvas == 96 for b in batches)
    loader = build_loader(ViewedDataset(source, POLICY, train=False), batch_size=5, shuffle=False, drop_last=True)
    assert [len(b) for b in loader] == [5, 5]


def test_replicas_partition_the_data(source):
    ds = ViewedDataset(source, POLICY, train=True, seed=2)
    parts = [_order(build_loader(ds, batch_size=4, shuffle=True, seed=2, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(12))


def test_worker_processes_give_the_same_batches(source):
    ds = ViewedDataset(source, POLICY, train=True, seed=9)
    main = build_loader(ds, batch_size=4, shuffle=True, seed=9)
    workers = build_loader(ds, batch_size=4, shuffle=True, seed=9, workers=1)
    for loader in (main, workers):
        set_epoch(loader, 3)
    for x, y in zip(main, workers, strict=True):
        assert x.indices == y.indices and x.views == y.views
        assert torch.equal(x.images, y.images)


def test_pin_memory_pins_every_moved_tensor_and_keeps_the_rest(source, monkeypatch):
    """The loader's pin thread calls ``Batch.pin_memory``; no CUDA here, so pinning is recorded, not done."""
    batch = Collate(96)([ViewedDataset(source, POLICY, train=False)[i] for i in range(2)])
    batch.knowledge = [{"p3": "a stored record"}, {"p3": "another"}]  # stays as read (collated later)
    batch.extras = {"gt": torch.ones(2)}
    pinned: list[int] = []

    def fake_pin(self):
        pinned.append(self.data_ptr())
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    tensors = [batch.images, batch.extras["gt"]] + [t[k] for t in batch.targets for k in ("boxes", "labels")]
    assert sorted(pinned) == sorted(t.data_ptr() for t in tensors)
    assert isinstance(out, Batch) and torch.equal(out.images, batch.images)
    assert out.knowledge is batch.knowledge and out.image_ids == batch.image_ids and out.views == batch.views


def test_build_loader_pins_only_when_asked(source):
    ds = ViewedDataset(source, POLICY, train=False)
    assert not build_loader(ds, batch_size=4, shuffle=False).pin_memory
    assert build_loader(ds, batch_size=4, shuffle=False, pin_memory=True).pin_memory
