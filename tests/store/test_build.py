"""Store building and stored distillation, end to end on a tiny teacher and data set."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from detkd.data.loader import Collate, ViewedDataset
from detkd.data.views import View, ViewPolicy
from detkd.distill.task import build_method, common_levels
from detkd.errors import ConfigError
from detkd.models.builders import build_detector
from detkd.models.checkpoint import save_checkpoint
from detkd.store.build import build_store
from detkd.store.format import StoreError
from detkd.store.reader import StoreReader
from detkd.store.replay import check_methods, check_store_for_run
from detkd.store.select import SelectionPolicy

POLICY = ViewPolicy(sizes=(64,), flip_prob=0.5)


@pytest.fixture
def teacher_ckpt(tmp_path, spec_factory, tiny_source):
    torch.manual_seed(0)
    teacher = build_detector(spec_factory("fcos", fpn_channels=32))
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, teacher, class_names=tiny_source.class_names)
    return path, teacher.eval()


def _build(tmp_path, tiny_source, ckpt, folder, **policy):
    return build_store(
        teacher_checkpoint=ckpt,
        source=tiny_source,
        policy=SelectionPolicy(**policy),
        views=POLICY.all_views(),
        canvas=POLICY.canvas,
        out_dir=tmp_path / folder,
        progress=False,
    )


def _teacher_features_on_replayed_view(teacher, source, index, view):
    ds = ViewedDataset(source, POLICY, train=True, view_provider=lambda record, rng: view)
    batch = Collate(POLICY.canvas)([ds[index]])
    with torch.no_grad():
        return {k: v[0] for k, v in teacher.features(batch.images, batch.image_sizes).items()}, batch.image_sizes[0]


def test_dense_store_equals_teacher_features_of_the_replayed_view(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    _build(tmp_path, tiny_source, ckpt, "dense", name="dense", channel_group=1)
    reader = StoreReader(tmp_path / "dense")
    assert reader.counts["records"] == 2 * len(tiny_source)
    for index in (0, 3):
        for view in POLICY.all_views():
            feats, size = _teacher_features_on_replayed_view(teacher, tiny_source, index, view)
            record = reader.read(tiny_source.records[index].image_id, view)
            for lvl, f in feats.items():
                stored = record[lvl].dense.float()
                h, w = stored.shape[-2:]
                assert (h, w) == (-(-size[0] // teacher.strides[lvl]), -(-size[1] // teacher.strides[lvl]))
                # fp16 storage; the build batches 8 images, this replay 1, so allow one fp16 rounding step.
                torch.testing.assert_close(stored, f[:, :h, :w].half().float(), rtol=2**-10, atol=1e-3)


def test_nms_ksd_values_are_teacher_features_at_cells(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    _build(tmp_path, tiny_source, ckpt, "sparse", name="nms-ksd", channel_group=4)
    reader = StoreReader(tmp_path / "sparse")
    view = View(64, flip=True)
    feats, _ = _teacher_features_on_replayed_view(teacher, tiny_source, 2, view)
    record = reader.read(tiny_source.records[2].image_id, view)
    for lvl, rec in record.items():
        f = feats[lvl]
        pooled = f.reshape(f.shape[0] // 4, 4, *f.shape[1:]).amax(1)
        expected = pooled[:, rec.yx[:, 0].long(), rec.yx[:, 1].long()].T
        torch.testing.assert_close(rec.values.float(), expected.half().float(), rtol=2**-10, atol=1e-3)
        assert rec.num_cells >= 1


def test_killed_build_resumes_to_identical_records(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    _build(tmp_path, tiny_source, ckpt, "clean", name="nms-ksd")
    # A child process builds the same store and is killed (SIGKILL) after a few written records.
    script = tmp_path / "kill.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, pickle, torch
        from detkd.store import writer
        from detkd.store.build import build_store
        from detkd.store.select import SelectionPolicy
        from detkd.data.views import ViewPolicy
        source = pickle.load(open({str(tmp_path / "src.pkl")!r}, "rb"))
        n = 0
        real = writer.StoreWriter.write
        def write(self, *a, **k):
            global n
            real(self, *a, **k)
            n += 1
            if n == 5:
                self.flush()
                os.kill(os.getpid(), 9)
        writer.StoreWriter.write = write
        p = ViewPolicy(sizes=(64,), flip_prob=0.5)
        build_store(teacher_checkpoint={str(ckpt)!r}, source=source, policy=SelectionPolicy(name="nms-ksd"),
                    views=p.all_views(), canvas=p.canvas, out_dir={str(tmp_path / "killed")!r}, progress=False)
    """)
    )
    import pickle

    with open(tmp_path / "src.pkl", "wb") as f:
        pickle.dump(tiny_source, f)
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -9
    _build(tmp_path, tiny_source, ckpt, "killed", name="nms-ksd")  # the same command again resumes
    a, b = StoreReader(tmp_path / "clean"), StoreReader(tmp_path / "killed")
    assert sorted(a.keys()) == sorted(b.keys()) and len(list(a.keys())) == 2 * len(tiny_source)
    for key in a.keys():
        ra, rb = a.read_arrays(key), b.read_arrays(key)
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


def test_mismatched_store_is_refused(tmp_path, tiny_source, teacher_ckpt, source_factory):
    ckpt, _ = teacher_ckpt
    _build(tmp_path, tiny_source, ckpt, "s", name="nms-ksd")
    reader = StoreReader(tmp_path / "s")
    check_store_for_run(reader, source=tiny_source, policy=POLICY)
    other = source_factory(tmp_path / "other", n=6, seed=1)
    with pytest.raises(StoreError, match="dataset_fingerprint"):
        check_store_for_run(reader, source=other, policy=POLICY)
    with pytest.raises(StoreError, match="canvas"):
        check_store_for_run(reader, source=tiny_source, policy=ViewPolicy(sizes=(96,)))


def test_dense_only_methods_are_refused_on_a_sparse_store(tmp_path, tiny_source, teacher_ckpt, spec_factory):
    ckpt, teacher = teacher_ckpt
    _build(tmp_path, tiny_source, ckpt, "s", name="nms-ksd")
    reader = StoreReader(tmp_path / "s")
    levels = common_levels(build_detector(spec_factory("fcos")), teacher)
    check_methods(reader, {"fitnet": build_method("fitnet", levels=levels, args={})})
    with pytest.raises(ConfigError, match="'ssim' needs whole teacher feature maps"):
        check_methods(reader, {"ssim": build_method("ssim", levels=levels, args={})})
