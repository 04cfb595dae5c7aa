"""Store building: the stored records are the teacher's knowledge of the views training replays."""

import dataclasses
import math
import pickle
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from detkd.data.loader import Collate, ViewedDataset
from detkd.data.views import View, ViewPolicy
from detkd.models.builders import build_detector
from detkd.models.checkpoint import save_checkpoint
from detkd.store.build import build_store
from detkd.store.detections import detection_cells
from detkd.store.format import StoreError
from detkd.store.pairs import FixedView
from detkd.store.reader import StoreReader
from detkd.store.replay import providers
from detkd.store.select import SelectionPolicy
from detkd.store.teacher import StoredTeacher
from detkd.store.verify import verify_store
from detkd.store.writer import merge_shards

POLICY = ViewPolicy(sizes=(64,), flip_prob=0.5)
VIEWS = POLICY.all_views()  # s64, s64-flip


def build(tmp_path, source, ckpt, folder, *, batch_size=8, **kw):
    policy = kw.pop("policy", None) or SelectionPolicy()
    return build_store(
        teacher_checkpoint=ckpt,
        source=source,
        policy=policy,
        views=kw.pop("views", VIEWS),
        canvas=POLICY.canvas,
        out_dir=tmp_path / folder,
        batch_size=batch_size,
        progress=False,
        **kw,
    )


def replay(source, index, view):
    """The batch of one image that training produces when it replays ``view``."""
    ds = ViewedDataset(source, POLICY, train=True, view_provider=FixedView(view))
    return Collate(POLICY.canvas)([ds[index]])


def teacher_features(teacher, batch):
    with torch.no_grad():
        return {lv: f[0] for lv, f in teacher.features(batch.images, batch.image_sizes).items()}


def valid(shape_hw, size, stride):
    return min(shape_hw[0], -(-size[0] // stride)), min(shape_hw[1], -(-size[1] // stride))


def test_dense_records_are_the_teacher_features_of_each_replayed_view(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    manifest = build(
        tmp_path, tiny_source, ckpt, "s", batch_size=1, policy=SelectionPolicy(name="dense", channel_group=1)
    )
    assert manifest.counts == {"images": 6, "records": 12, "bytes": manifest.counts["bytes"]}
    assert manifest.feature_shapes == {"p3": [8, 8], "p4": [4, 4], "p5": [2, 2], "p6": [1, 1], "p7": [1, 1]}
    assert manifest.preprocessing["sizes"] == [64] and manifest.extra["teacher_ap"] == 0.25
    reader = StoreReader(tmp_path / "s")
    for index in range(len(tiny_source)):
        for view in VIEWS:
            batch = replay(tiny_source, index, view)
            record = reader.read(tiny_source.records[index].image_id, view)
            for lv, f in teacher_features(teacher, batch).items():
                h, w = valid(f.shape[-2:], batch.image_sizes[0], teacher.strides[lv])
                # Same pipeline, same batch composition: bit-identical up to the fp16 cast.
                assert torch.equal(record[lv].dense, f[:, :h, :w].half())


def test_training_loader_replays_stored_views_with_their_knowledge(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "s", policy=SelectionPolicy(name="dense", channel_group=1))
    reader = StoreReader(tmp_path / "s")
    views, knowledge = providers(reader, tiny_source)
    ds = ViewedDataset(tiny_source, POLICY, train=True, view_provider=views, knowledge_provider=knowledge)
    seen = set()
    stored = StoredTeacher(reader)
    for epoch in range(3):
        ds.set_epoch(epoch)
        batch = Collate(POLICY.canvas)([ds[i] for i in range(len(tiny_source))])
        seen |= {(i, v) for i, v in zip(batch.image_ids, batch.views, strict=True)}
        dense = stored.knowledge(batch, frozenset({"features"})).features
        with torch.no_grad():
            online = teacher.features(batch.images, batch.image_sizes)
        for lv, f in online.items():
            for j, size in enumerate(batch.image_sizes):
                h, w = valid(f.shape[-2:], size, teacher.strides[lv])
                torch.testing.assert_close(dense[lv][j, :, :h, :w], f[j, :, :h, :w], rtol=2e-3, atol=2e-3)
                assert not dense[lv][j, :, h:, :].any() and not dense[lv][j, :, :, w:].any()
    assert {v for _, v in seen} == set(VIEWS)  # the rng draws both stored views


@pytest.mark.parametrize("value_dtype", ["float16", "int8", "int4"])
def test_nms_ksd_cells_are_peaks_of_the_teacher_features(tmp_path, tiny_source, teacher_ckpt, value_dtype):
    ckpt, teacher = teacher_ckpt
    policy = SelectionPolicy(name="nms-ksd", channel_group=4, top_k=3, value_dtype=value_dtype)
    build(tmp_path, tiny_source, ckpt, "s", batch_size=1, policy=policy)
    reader = StoreReader(tmp_path / "s")
    for index in (0, 4):
        for view in VIEWS:
            batch = replay(tiny_source, index, view)
            feats = teacher_features(teacher, batch)
            record = reader.read(tiny_source.records[index].image_id, view)
            expected = policy.select_image(feats, image_size=batch.image_sizes[0], strides=teacher.strides)
            for lv, f in feats.items():
                rec = record[lv]
                assert torch.equal(rec.yx, expected[lv].yx) and torch.equal(rec.score, expected[lv].score)
                h, w = valid(f.shape[-2:], batch.image_sizes[0], teacher.strides[lv])
                saliency = f[:, :h, :w].amax(0)  # channel max pooling; each kept cell is its 3 x 3 window's max
                assert 1 <= rec.num_cells <= 3
                for y, x in rec.yx.long().tolist():
                    assert saliency[y, x] == saliency[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].max()
                pooled = f.reshape(4, 4, *f.shape[1:]).amax(1)  # 16 channels -> 4 groups of 4
                cells = pooled[:, rec.yx[:, 0].long(), rec.yx[:, 1].long()].T
                if value_dtype == "float16":
                    assert torch.equal(rec.values, cells.half())
                else:  # per cell: within half a step (max |x| / 254 or / 14) plus the float16 rounding
                    half_step = cells.abs().amax(1, keepdim=True) / (254 if value_dtype == "int8" else 14)
                    bound = half_step * 1.01 + cells.abs() * 2**-10
                    assert ((rec.values.float() - cells).abs() <= bound).all()
    raw = reader.read_arrays(f"{tiny_source.records[0].image_id}/{VIEWS[0].key}")
    assert raw["p3/v"].dtype == {"float16": torch.float16, "int8": torch.int8, "int4": torch.uint8}[value_dtype]
    assert raw["p3/j"].dtype == torch.uint8  # 8 x 8 cells: one byte per cell index


def test_detections_policy_keeps_the_cells_under_teacher_detections(tmp_path, spec_factory, tiny_source):
    torch.manual_seed(0)
    teacher = build_detector(spec_factory("fcos", score_thresh=0.0, detections_per_img=10)).eval()
    save_checkpoint(tmp_path / "t.pt", teacher, class_names=tiny_source.class_names)
    policy = SelectionPolicy(name="detections", channel_group=1, top_k=4)
    build(tmp_path, tiny_source, tmp_path / "t.pt", "s", batch_size=1, policy=policy, views=[View(64)])
    record = StoreReader(tmp_path / "s").read(tiny_source.records[1].image_id, View(64))
    batch = replay(tiny_source, 1, View(64))
    dets = teacher.predict(batch.images, batch.image_sizes)[0]
    assert len(dets["boxes"]) == 10
    shapes = {lv: valid((8, 8), batch.image_sizes[0], s) for lv, s in teacher.strides.items()}
    expected = detection_cells(dets["boxes"], dets["scores"], strides=teacher.strides, level_shapes=shapes, top_k=4)
    assert sum(rec.num_cells for rec in record.values()) >= 1
    for lv, (yx, score) in expected.items():
        assert torch.equal(record[lv].yx.long(), yx) and torch.equal(record[lv].score, score.half())


def test_killed_build_resumes_to_identical_records(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "clean")
    with open(tmp_path / "src.pkl", "wb") as f:
        pickle.dump(tiny_source, f)
    # A child builds the same store and SIGKILLs itself right after its 5th record is committed.
    script = tmp_path / "kill.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, pickle, torch
        from detkd.data.views import ViewPolicy
        from detkd.store import writer
        from detkd.store.build import build_store
        from detkd.store.select import SelectionPolicy
        torch.set_num_threads(1)
        source = pickle.load(open({str(tmp_path / "src.pkl")!r}, "rb"))
        real, n = writer.StoreWriter.write, [0]
        def write(self, *a, **k):
            real(self, *a, **k)
            n[0] += 1
            if n[0] == 5:
                self.flush()
                os.kill(os.getpid(), 9)
        writer.StoreWriter.write = write
        p = ViewPolicy(sizes=(64,), flip_prob=0.5)
        build_store(teacher_checkpoint={str(ckpt)!r}, source=source, policy=SelectionPolicy(), views=p.all_views(),
                    canvas=p.canvas, out_dir={str(tmp_path / "killed")!r}, progress=False)
        """)
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    report = verify_store(tmp_path / "killed")
    assert report.records == 5 and any("did not finish" in e for e in report.errors)
    manifest = build(tmp_path, tiny_source, ckpt, "killed")  # the same command again resumes
    assert manifest.complete and manifest.extra["last_run"]["built"] == 7
    a, b = StoreReader(tmp_path / "clean"), StoreReader(tmp_path / "killed")
    assert sorted(a.keys()) == sorted(b.keys()) and len(a) == 12
    for key in a.keys():
        ra, rb = a.read_arrays(key), b.read_arrays(key)
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    assert verify_store(tmp_path / "killed").ok
    again = build(tmp_path, tiny_source, ckpt, "killed")  # nothing left to do
    assert again.extra["last_run"]["built"] == 0 and again.extra["runs"] == 2


def test_sharded_build_merges_to_the_single_build(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "single")
    parts = [build(tmp_path, tiny_source, ckpt, "sharded", shard=i, num_shards=2) for i in (0, 1)]
    assert [p.counts["images"] for p in parts] == [3, 3]  # images 0, 2, 4 and 1, 3, 5
    unmerged = StoreReader(tmp_path / "sharded")
    assert unmerged.complete and len(unmerged) == 12 and unmerged.extra["built"] == 12
    merged = merge_shards(tmp_path / "sharded")
    assert merged.counts == StoreReader(tmp_path / "single").counts and merged.extra["shards"] == 2
    a, b = StoreReader(tmp_path / "single"), StoreReader(tmp_path / "sharded")
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(a.read_arrays(k).keys() == b.read_arrays(k).keys() for k in a.keys())
    assert verify_store(tmp_path / "sharded").ok and not list((tmp_path / "sharded").glob("shard-*"))


def test_mirror_flips_stores_unflipped_views_and_mirrors_them(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    for name in ("dense", "nms-ksd"):
        policy = SelectionPolicy(name=name, channel_group=1 if name == "dense" else 4)
        manifest = build(tmp_path, tiny_source, ckpt, name, policy=policy, mirror_flips=True)
        assert manifest.counts["records"] == 6 and manifest.preprocessing["mirror_flips"] is True
        reader = StoreReader(tmp_path / name)
        assert {View.from_key(k.split("/")[1]) for k in reader.keys()} == {View(64)}
        views, knowledge = providers(reader, tiny_source)
        record = tiny_source.records[0]
        assert {views(record, random.Random(s)) for s in range(20)} == set(VIEWS)
        base = reader.read(record.image_id, View(64))
        mirrored = knowledge(record.image_id, View(64, flip=True))
        for lv, rec in base.items():
            if name == "dense":
                assert torch.equal(mirrored[lv].dense, rec.dense.flip(-1))
            else:  # 64 x 48 image: 64 px wide after the view, ceil(64 / stride) valid columns
                cols = -(-64 // manifest.strides[lv])
                assert torch.equal(mirrored[lv].yx[:, 1], cols - 1 - rec.yx[:, 1])
                assert torch.equal(mirrored[lv].values, rec.values)
    # A run that does not flip replays unflipped views only.
    views, _ = providers(reader, tiny_source, ViewPolicy(sizes=(64,), flip_prob=0.0))
    assert {views(tiny_source.records[0], random.Random(s)) for s in range(20)} == {View(64)}
    # --views noflip with mirroring has no flipped view to serve.
    build(tmp_path, tiny_source, ckpt, "noflip", views=[View(64)], mirror_flips=True)
    views, _ = providers(StoreReader(tmp_path / "noflip"), tiny_source)
    assert {views(tiny_source.records[0], random.Random(s)) for s in range(20)} == {View(64)}


def test_importance_store_holds_the_teachers_gkd_maps(tmp_path, tiny_source, teacher_ckpt):
    from detkd.knowledge.importance import teacher_importance

    ckpt, teacher = teacher_ckpt
    policy = SelectionPolicy(name="dense", channel_group=1)
    build(tmp_path, tiny_source, ckpt, "s", batch_size=1, policy=policy, with_importance=True)
    reader = StoreReader(tmp_path / "s")
    batch = replay(tiny_source, 2, View(64, flip=True))
    maps = teacher_importance(teacher, batch.images, batch.image_sizes, batch.targets)
    record = reader.read(tiny_source.records[2].image_id, View(64, flip=True))
    for lv, rec in record.items():
        h, w = rec.dense.shape[-2:]
        assert rec.extras["gi"].dtype == torch.float16 and rec.extras["gc"].dtype == torch.float32
        torch.testing.assert_close(rec.extras["gi"].float(), maps.spatial[lv][0, :, :h, :w], rtol=0, atol=1e-3)
        torch.testing.assert_close(rec.extras["gc"], maps.channel[lv][0], rtol=1e-4, atol=1e-12)
    batch = dataclasses.replace(batch, knowledge=[record])
    knowledge = StoredTeacher(reader).knowledge(batch, frozenset({"features", "importance"}))
    assert knowledge.importance["p3"].shape == (1, 1, 8, 8) and knowledge.channel_importance["p3"].shape == (1, 16)
    with pytest.raises(StoreError, match="whole-map policy .* and --channel-group 1"):
        build(tmp_path, tiny_source, ckpt, "bad", policy=SelectionPolicy(), with_importance=True)


def test_build_refuses_bad_settings(tmp_path, tiny_source, teacher_ckpt, spec_factory):
    ckpt, _ = teacher_ckpt
    with pytest.raises(StoreError, match=r"level\(s\) \['p9'\]"):
        build(tmp_path, tiny_source, ckpt, "a", policy=SelectionPolicy(per_level={"p9": "dense"}))
    with pytest.raises(StoreError, match="larger than the 64px canvas"):
        build(tmp_path, tiny_source, ckpt, "b", views=[View(96)])
    other = build_detector(spec_factory("fcos"))
    save_checkpoint(tmp_path / "o.pt", other, class_names=["cat", "dog"])
    with pytest.raises(StoreError, match="teacher classes"):
        build(tmp_path, tiny_source, tmp_path / "o.pt", "c")
    with pytest.raises(StoreError, match=r"odd number per cell \(channel_group 16"):  # 16 -> 1: no pairs
        build(tmp_path, tiny_source, ckpt, "e", policy=SelectionPolicy(channel_group=16, value_dtype="int4"))
    build(tmp_path, tiny_source, ckpt, "d")
    with pytest.raises(StoreError, match="different .*policy"):  # a rerun with other settings does not mix stores
        build(tmp_path, tiny_source, ckpt, "d", policy=SelectionPolicy(name="dense"))


@pytest.mark.parametrize("value_dtype", ["float16", "int8", "int4"])
def test_selecting_teacher_serves_what_the_store_serves(tmp_path, tiny_source, teacher_ckpt, value_dtype):
    from detkd.store.teacher import SelectingTeacher

    ckpt, teacher = teacher_ckpt
    policy = SelectionPolicy(top_k=5, channel_group=2, per_level={"p6": "dense"}, value_dtype=value_dtype)
    build(tmp_path, tiny_source, ckpt, "s", policy=policy)
    reader = StoreReader(tmp_path / "s")
    views, knowledge = providers(reader, tiny_source)
    ds = ViewedDataset(tiny_source, POLICY, train=True, view_provider=views, knowledge_provider=knowledge)
    batch = Collate(POLICY.canvas)([ds[i] for i in range(len(tiny_source))])
    needs = frozenset({"features"})
    stored = StoredTeacher(reader).knowledge(batch, needs)
    live = SelectingTeacher(teacher, policy).knowledge(batch, needs)
    qmax = {"float16": math.inf, "int8": 127, "int4": 7}[value_dtype]
    assert live.channel_group == stored.channel_group == 2
    assert set(live.cells) == set(stored.cells) == {"p3", "p4", "p5", "p7"} and set(live.features) == {"p6"}
    for lv, cells in stored.cells.items():
        assert torch.equal(live.cells[lv].batch_index, cells.batch_index)
        assert torch.equal(live.cells[lv].yx, cells.yx)
        # The store ran the teacher on other batches: equal up to float16 rounding (int8: a value
        # that far off a rounding boundary may land one step, ~max|x| / 127 of its cell, away).
        step = cells.values.abs().amax(1, keepdim=True) / qmax
        assert ((live.cells[lv].values - cells.values).abs() <= 2e-3 + 2e-3 * cells.values.abs() + step).all()
    dense = stored.features["p6"]
    bound = 2e-3 + 2e-3 * dense.abs() + dense.abs().amax(1, keepdim=True) / qmax  # per cell, over channels
    assert ((live.features["p6"] - dense).abs() <= bound).all()
