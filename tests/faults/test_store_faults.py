"""Fault suite, store half: what a careless or hostile user can do to a knowledge store, and what they see.

Each case asserts the user-visible outcome: exit code, the message naming the file, nothing lost.
Cases that already passed before this suite live beside the code they test and are not repeated:
kill -9 during a build then resume to byte-equal records (tests/store/test_build.py
test_killed_build_resumes_to_identical_records), a flipped byte caught by checksum naming the record
(tests/commands/test_store_cli.py, tests/store/test_writer_reader.py), a store built on other
annotations or another size refused (tests/store/test_replay.py), a store directory built from another
teacher refused (tests/store/test_writer_reader.py test_reopen_continues_and_refuses_other_manifests).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from detkd.cli import main
from detkd.data.formats.detect import open_source
from detkd.data.synthetic import generate_synthetic
from detkd.data.views import ViewPolicy
from detkd.models.builders import DetectorSpec, build_detector
from detkd.models.checkpoint import save_checkpoint
from detkd.store.build import build_store
from detkd.store.format import StoreError
from detkd.store.lmdb_env import disk_errors, open_readonly
from detkd.store.lock import BuildLock
from detkd.store.manifest import Manifest, write_json_atomic
from detkd.store.reader import StoreReader
from detkd.store.replay import check_store_for_run, without_unstored
from detkd.store.select import SelectionPolicy
from detkd.store.verify import verify_store

REPO = Path(__file__).resolve().parents[2]
POLICY = ViewPolicy(sizes=(64,), flip_prob=0.5)
DAMAGES = ("half", "empty", "garbage")


def make_teacher(path: Path, names: list[str], ap: float | None) -> Path:
    torch.manual_seed(0)
    spec = DetectorSpec(family="fcos", num_classes=len(names), fpn_channels=16, head_convs=1)
    save_checkpoint(path, build_detector(spec), class_names=names, extra={"metrics": {"AP": ap}} if ap else {})
    return path


def build(root: Path, data: Path, out: str, *, teacher: str = "t.pt", **kw):
    return build_store(
        teacher_checkpoint=root / teacher,
        source=open_source(data, format="coco", split="train"),
        policy=SelectionPolicy(),
        views=POLICY.all_views(),
        canvas=POLICY.canvas,
        out_dir=root / out,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data (6 train, 2 val images of 64 px), a teacher with AP 0.4, a clean store, a recipe."""
    root = tmp_path_factory.mktemp("store_faults")
    data = generate_synthetic(root / "data", num_train=6, num_val=2, image_size=64, seed=0)
    names = open_source(data, format="coco", split="train").class_names
    make_teacher(root / "t.pt", names, 0.4)
    build(root, data, "clean")
    recipe = {
        "data": {"root": str(data), "sizes": [64], "batch_size": 4, "workers": 0},
        "model": {"family": "fcos", "fpn_channels": 16, "head_convs": 1},
        "train": {"epochs": 1, "warmup_iters": 1, "out": str(root / "run"), "device": "cpu"},
    }
    (root / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    return root, data, names


def copy_store(root: Path, name: str, src: str = "clean") -> Path:
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / src, out)
    return out


def damage(data_file: Path, how: str) -> None:
    size = data_file.stat().st_size
    if how == "half":
        os.truncate(data_file, size // 2)
    elif how == "empty":
        os.truncate(data_file, 0)
    else:
        data_file.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# 1. A truncated, emptied or garbage data.mdb: a message, never a signal -------------------------------


def test_damaged_data_file_is_an_error_never_a_signal(world, tmp_path):
    root, data, _ = world
    stores = {}
    for how in DAMAGES:
        stores[how] = copy_store(root, f"damaged-{how}")
        damage(stores[how] / "records.lmdb" / "data.mdb", how)
    # SIGBUS would kill pytest itself: every command runs in one child, which reports each outcome.
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from detkd.cli import main
        results = {{}}
        for how, store in {json.dumps({k: str(v) for k, v in stores.items()})}.items():
            for name, args in (("verify", ["store", "verify", store]), ("info", ["store", "info", store]),
                               ("distill", ["distill", {str(root / "recipe.yaml")!r}, "method=fitnet",
                                            "teacher=" + store, "train.out={tmp_path / "run"}", "--no-progress"])):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    rc = main(args)
                results[how + "/" + name] = [rc, out.getvalue(), err.getvalue()]
        print(json.dumps(results))
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"the child died (signal {-proc.returncode}?): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.splitlines()[-1])
    for how in DAMAGES:
        path = stores[how] / "records.lmdb" / "data.mdb"
        expected = {
            "half": f"{path} is truncated: {path.stat().st_size} bytes, the store needs at least 12288",
            "empty": f"{path} is truncated: 0 bytes, the store needs at least 8192",
            "garbage": f"{path} is not an LMDB data file (meta page 0 is garbage)",
        }[how]
        rc, out, _ = results[f"{how}/verify"]
        assert rc == 1 and "1 problem(s)" in out and expected in out, out
        rc, out, _ = results[f"{how}/info"]
        assert rc == 1 and "DAMAGED)" in out and f"DAMAGED: {expected}" in out, out
        rc, _, err = results[f"{how}/distill"]
        assert rc == 2 and f"detkd: error: {expected}" in err, err
        assert not (tmp_path / "run" / "last.pt").exists()


def test_every_reader_process_checks_the_file_before_mapping_it(world, tmp_path):
    root, _, _ = world
    store = copy_store(root, "damaged-late")
    reader = StoreReader(store)  # checked fine; then damaged before a DataLoader worker opens it
    damage(store / "records.lmdb" / "data.mdb", "half")
    with pytest.raises(StoreError, match="data.mdb is truncated"):
        open_readonly(store / "records.lmdb")  # what a worker's first read goes through
    with pytest.raises(StoreError, match="data.mdb is truncated"):
        StoreReader(store)
    with pytest.raises(StoreError, match="data.mdb is truncated"):
        build(root, root / "data", "damaged-late")  # resuming into a damaged store is refused too
    del reader


# 2. Skipped views are recorded, shown, fail verify unless accepted; the run leaves those images out ------


def test_a_build_that_skipped_an_unreadable_image_records_the_gap(world, tmp_path, capsys, caplog):
    root, data, _ = world
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    source = open_source(bad_data, format="coco", split="train")
    broken = source.records[2]
    Path(broken.file).write_bytes(b"not an image")
    out = tmp_path / "gappy"
    args = ["store", "build", "--teacher", str(root / "t.pt"), "--data", str(bad_data), "--size", "64"]
    rc, text, _ = run_cli([*args, "--workers", "0", "--no-progress", "--out", str(out)], capsys)
    assert rc == 0 and "complete, 2 skipped image-view(s)" in text
    assert f"image {broken.image_id} ({broken.file}) view s64: {broken.file}: cannot decode image" in text
    manifest = Manifest.load(out)
    assert manifest.complete and [g["view"] for g in manifest.gaps] == ["s64", "s64-flip"]
    assert {g["image_id"] for g in manifest.gaps} == {broken.image_id}
    rc, text, _ = run_cli(["store", "verify", str(out)], capsys)
    assert rc == 1 and "10 records" in text and "2 image-view(s) were skipped by the build" in text
    assert "--allow-gaps" in text and str(broken.file) in text
    rc, text, _ = run_cli(["store", "verify", str(out), "--allow-gaps"], capsys)
    assert rc == 0 and "OK (2 skipped image-view(s) accepted)" in text
    # A run from it leaves the image out, counted and logged, instead of failing mid-epoch.
    reader = StoreReader(out)
    with caplog.at_level(logging.WARNING):
        kept, left_out = without_unstored(reader, source, POLICY)
    assert left_out == 1 and len(kept) == len(source) - 1 and broken.image_id not in {r.image_id for r in kept.records}
    assert "1 training image(s) have no stored view" in caplog.text and f"image id(s) {broken.image_id}" in caplog.text
    # Repair the image and rerun the same command: the gap is built and forgotten.
    shutil.copy(Path(data, "images", "train", Path(broken.file).name), broken.file)
    rc, text, _ = run_cli([*args, "--workers", "0", "--no-progress", "--out", str(out)], capsys)
    assert rc == 0 and "complete)" in text and "gaps" not in text and Manifest.load(out).gaps == []
    assert verify_store(out).ok and verify_store(out).records == 12


# 3. Image content is part of the data identity ------------------------------------------------------------


def test_a_store_built_on_other_pixels_is_refused_naming_the_first_image(world, tmp_path, capsys, caplog):
    root, data, _ = world
    inverted = tmp_path / "inverted"
    shutil.copytree(data, inverted)
    for png in sorted((inverted / "images" / "train").glob("*.png")):
        Image.fromarray(255 - np.asarray(Image.open(png).convert("RGB"))).save(png)
    source = open_source(inverted, format="coco", split="train")
    first = min(source.records, key=lambda r: r.image_id)
    rc, _, err = run_cli(
        [
            "distill",
            str(root / "recipe.yaml"),
            "method=fitnet",
            f"teacher={root / 'clean'}",
            f"data.root={inverted}",
            f"train.out={tmp_path / 'run'}",
            "--no-progress",
        ],
        capsys,
    )
    assert rc == 2 and "was built on other pixels" in err
    assert f"image {first.image_id} ({first.file}) differs from the image the store was built on" in err
    assert not (tmp_path / "run" / "last.pt").exists()
    # The original images pass, and an old store (no content hashes) is still read, with a note.
    original = open_source(data, format="coco", split="train")
    check_store_for_run(StoreReader(root / "clean"), source=original, policy=POLICY)
    old = copy_store(root, "old-store")
    (old / "content.json").unlink()
    with caplog.at_level(logging.INFO, logger="detkd.store.content"):
        check_store_for_run(StoreReader(old), source=source, policy=POLICY)  # other pixels, but cannot tell
    assert "built before content hashes: the images' content was not checked" in caplog.text


# 4. One build at a time per store directory -------------------------------------------------------------


def test_a_second_build_into_the_same_directory_is_refused_at_once(world, tmp_path, capsys):
    root, data, _ = world
    out = tmp_path / "busy"
    # The first build runs in a child that stops (forever) at its first record, holding the lock.
    script = textwrap.dedent(f"""
        import sys, time, torch
        from detkd.data.formats.detect import open_source
        from detkd.data.views import ViewPolicy
        from detkd.store import writer
        from detkd.store.build import build_store
        from detkd.store.select import SelectionPolicy
        def write(self, *a, **k):
            print("building", flush=True)
            time.sleep(600)
        writer.StoreWriter.write = write
        p = ViewPolicy(sizes=(64,), flip_prob=0.5)
        source = open_source({str(data)!r}, format="coco", split="train")
        build_store(teacher_checkpoint={str(root / "t.pt")!r}, source=source, policy=SelectionPolicy(),
                    views=p.all_views(), canvas=p.canvas, out_dir={str(out)!r}, progress=False)
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "building"
        args = ["store", "build", "--teacher", str(root / "t.pt"), "--data", str(data), "--size", "64"]
        args += ["--workers", "0", "--no-progress", "--out", str(out)]
        rc, _, err = run_cli(args, capsys)
        assert rc == 2 and f"detkd: error: {out}: another build is writing this store (pid {child.pid})" in err
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    rc, text, _ = run_cli(args, capsys)  # the kernel dropped the dead build's lock: this one resumes it
    assert rc == 0 and "complete" in text and verify_store(out).ok


def test_shards_of_one_build_share_the_directory_but_exclude_a_single_build(tmp_path):
    shard0 = BuildLock(tmp_path, shard=0).acquire()
    shard1 = BuildLock(tmp_path, shard=1).acquire()  # shards of one build run in parallel
    for lock in (BuildLock(tmp_path), BuildLock(tmp_path, shard=0)):
        with pytest.raises(StoreError, match=rf"another build is writing this store \(pid {os.getpid()}\)"):
            lock.acquire()
    shard0.release()
    shard1.release()
    BuildLock(tmp_path).acquire().release()


# 5. Disk full / permission errors during a build --------------------------------------------------------


class _FullDisk:
    """An LMDB environment whose write transactions fail as py-lmdb reports ENOSPC."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env

    def begin(self, *args, write: bool = False, **kw):
        if write:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return self._env.begin(*args, write=write, **kw)

    def __getattr__(self, name):
        return getattr(self._env, name)


def test_disk_full_during_a_build_is_said_and_leaves_nothing_half_written(world, tmp_path, capsys, monkeypatch):
    from detkd.store import lmdb_env

    root, data, _ = world
    out = tmp_path / "full"
    real_init = lmdb_env.WritableEnv.__init__

    def full_init(self, *a, **k):
        real_init(self, *a, **k)
        self.env = _FullDisk(self.env)

    monkeypatch.setattr(lmdb_env.WritableEnv, "__init__", full_init)
    args = ["store", "build", "--teacher", str(root / "t.pt"), "--data", str(data), "--size", "64"]
    args += ["--workers", "0", "--no-progress", "--out", str(out)]
    rc, _, err = run_cli(args, capsys)
    data_file = out / "records.lmdb" / "data.mdb"
    assert rc == 2 and f"detkd: error: {data_file}: no space left on device (free some space" in err
    assert not Manifest.load(out).complete  # nothing half-written is taken for a store
    report = verify_store(out)
    assert not report.ok and any("did not finish" in e for e in report.errors)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    rc, text, _ = run_cli(args, capsys)  # space freed: the same command finishes the store
    assert rc == 0 and verify_store(out).ok


def test_os_errors_while_writing_name_the_file_and_remove_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreError, match=f"^{target}: no space left on device"):
        write_json_atomic(target, {"a": 1})
    assert list(tmp_path.iterdir()) == []  # the temp file is gone, no manifest appeared
    monkeypatch.undo()
    with pytest.raises(StoreError, match=f"^{target}: permission denied$"), disk_errors(target):
        raise lmdb.ReadonlyError("mdb_env_open: Permission denied")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=f"^{blocker / 'store'}: not a directory"):
        BuildLock(blocker / "store").acquire()  # --out under a file: the OS error, said as such


# 6. A weak teacher is flagged in the store paths, in the online path's words ------------------------------


def test_a_weak_teacher_is_recorded_and_flagged_at_build_and_at_run(world, tmp_path, capsys, caplog):
    root, data, names = world
    make_teacher(tmp_path / "weak.pt", names, 0.001)
    with caplog.at_level(logging.WARNING):
        manifest = build(tmp_path, data, "weak", teacher="weak.pt")
    assert manifest.extra["teacher_ap"] == 0.001 and manifest.extra["teacher_ap_source"] == "recorded in the checkpoint"
    assert "!!! the teacher's AP (x100) is 0.1 (recorded in the checkpoint): is it trained" in caplog.text
    rc, text, _ = run_cli(["store", "info", str(tmp_path / "weak")], capsys)
    assert rc == 0 and "AP (x100) 0.1 (WEAK TEACHER" in text
    caplog.clear()
    from detkd.config import load_recipe
    from detkd.runs import distill

    recipe = json.loads((root / "recipe.yaml").read_text())
    recipe["train"]["out"] = str(tmp_path / "run")
    recipe["distill"] = {"teacher": str(tmp_path / "weak"), "methods": [{"name": "fitnet"}]}
    with caplog.at_level(logging.WARNING):
        distill(load_recipe(None, recipe), progress=False, stop_after=1)
    assert "!!! the teacher's AP (x100) is 0.1 (recorded in the store): is it trained" in caplog.text


def test_the_online_path_warns_in_the_same_words(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from detkd.config import load_recipe
    from detkd.runs import distillation as run

    monkeypatch.setattr(run, "measure_teacher_ap", lambda *a, **k: (0.001, 0.002))
    recipe = load_recipe(
        None, {"data": {"root": str(tmp_path)}, "distill": {"teacher": "t.pt", "expected_student_ap": 0.3}}
    )
    with caplog.at_level(logging.WARNING):
        assert run.check_teacher(None, SimpleNamespace(val_source=None, policy=None), recipe, "cpu") == 0.001
    assert "!!! the teacher's AP (x100) is 0.1 (t.pt): is it trained, and is this the right checkpoint?" in caplog.text
    assert "!!! teacher AP (x100) 0.1 (t.pt) is not clearly better than the student's expected 30.0" in caplog.text


def test_check_teacher_measures_an_unknown_teacher_ap_at_build(world, tmp_path):
    root, data, names = world
    make_teacher(tmp_path / "plain.pt", names, None)
    val = open_source(data, format="coco", split="val")
    manifest = build(tmp_path, data, "measured", teacher="plain.pt", check_teacher_on=val)
    assert 0.0 <= manifest.extra["teacher_ap"] <= 1.0
    assert manifest.extra["teacher_ap_source"] == "measured on the validation split at build time"


# 7. A directory that is not a store -----------------------------------------------------------------------


def test_a_directory_without_manifest_is_not_called_a_missing_checkpoint(world, tmp_path, capsys):
    root, _, _ = world
    empty = tmp_path / "interrupted"
    empty.mkdir()
    rc, _, err = run_cli(
        ["distill", str(root / "recipe.yaml"), "method=fitnet", f"teacher={empty}", "--no-progress"], capsys
    )
    assert rc == 2 and f"{empty}: not a detkd store: a directory without manifest.json" in err
    assert f"resume it with `detkd store build ... --out {empty}`" in err and "checkpoint" not in err


# 8. Damaged manifest -------------------------------------------------------------------------------------


def test_a_damaged_manifest_is_named(world, capsys):
    root, _, _ = world
    store = copy_store(root, "bad-manifest")
    (store / "manifest.json").write_text((store / "manifest.json").read_text()[:100])
    rc, text, _ = run_cli(["store", "verify", str(store)], capsys)
    assert rc == 1 and f"{store / 'manifest.json'}: not valid JSON" in text
    rc, _, err = run_cli(["store", "info", str(store)], capsys)
    assert rc == 2 and f"detkd: error: {store / 'manifest.json'}: not valid JSON" in err
