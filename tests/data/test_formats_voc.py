"""VocSource on VOC folders written here, and on the shared BCCD data set when present."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detkd.data.formats.base import stable_image_id
from detkd.data.formats.voc import VocSource
from detkd.errors import DataError

BCCD = Path("/work/shared/data/bccd")


def _img(path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def _xml(root, stem, objects, size=(32, 24), image=True):
    """objects: (name, (xmin, ymin, xmax, ymax), difficult); size None leaves <size> out."""
    if image:
        _img(root / "JPEGImages" / f"{stem}.jpg", 32, 24)
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{stem}.xml").write_text(
        f'<?xml version="1.0" encoding="utf-8"?>\n<annotation><filename>{stem}.jpg</filename>{size_xml}'
        f"{objs}</annotation>"
    )


def _split(root, name, stems):
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{s}\n" for s in stems))


def test_one_based_boxes_difficult_ignore_and_classes_from_all_xml(tmp_path):
    _xml(tmp_path, "a", [("dog", (1, 1, 10, 20), 0), ("cat", (5, 5, 15, 15), 1), ("cat", (3, 4, 3, 9), 0)])
    _xml(tmp_path, "b", [("zebra", (2, 2, 8, 8), 0)])  # only in val: its class still counts
    _split(tmp_path, "train", ["a"])
    _split(tmp_path, "val", ["b", "a"])
    train, val = VocSource(tmp_path, split="train"), VocSource(tmp_path, split="val")
    assert train.class_names == val.class_names == ["cat", "dog", "zebra"]
    (r,) = train.records
    assert r.file == tmp_path / "JPEGImages" / "a.jpg" and (r.height, r.width) == (24, 32)
    assert r.boxes.tolist() == [[0, 0, 10, 20]] and r.labels.tolist() == [2]
    assert r.ignore.tolist() == [[4, 4, 15, 15]] and r.ignore_labels.tolist() == [1]
    assert dict(train.problems.counts) == {"empty box": 1}  # xmax == xmin: a click, not a box
    # Ids hash the stem: the same image has the same id in every split.
    assert r.image_id == stable_image_id("a") == 2285969620036808
    assert [x.image_id for x in val.records] == [stable_image_id("b"), r.image_id]
    assert val.records[0].labels.tolist() == [3]


def test_item_problems_are_counted_and_skipped(tmp_path):
    _xml(tmp_path, "ok", [("cat", (1, 1, 8, 8), 0), ("bird", (1, 1, 8, 8), 0), ("cat", (20, 10, 40, 30), 0)])
    _xml(tmp_path, "noimage", [("cat", (1, 1, 8, 8), 0)], image=False)
    _xml(tmp_path, "wrongsize", [("cat", (1, 1, 8, 8), 0)], size=(64, 48))
    _xml(tmp_path, "nosize", [("cat", (2, 2, 9, 9), 0)], size=None)
    _xml(tmp_path, "badbox", [("cat", ("x", 1, 8, 8), 0), ("cat", (9, 1, 4, 8), 0)])
    _split(tmp_path, "train", ["ok", "noimage", "wrongsize", "nosize", "badbox", "noxml"])
    src = VocSource(tmp_path, split="train", class_names=["cat"])
    assert [r.file.stem for r in src.records] == ["ok", "nosize", "badbox"]
    ok, nosize, badbox = src.records
    assert ok.boxes.tolist() == [[0, 0, 8, 8], [19, 9, 32, 24]] and ok.labels.tolist() == [1, 1]
    assert (nosize.height, nosize.width) == (24, 32) and nosize.boxes.tolist() == [[1, 1, 9, 9]]
    assert len(badbox.boxes) == 0
    assert dict(src.problems.counts) == {
        "unknown category": 1,
        "box outside image": 1,
        "missing image": 1,
        "size mismatch": 1,
        "malformed box": 1,
        "empty box": 1,
        "missing annotation": 1,
    }
    assert "noxml.xml: listed in train.txt but not found" in src.problems.summary()


@pytest.mark.parametrize(
    "text, message",
    [
        ("<annotation><size>", "malformed xml"),
        ("", "annotation file is empty"),
        ("<html></html>", "not a VOC annotation"),
    ],
)
def test_bad_xml_skips_its_image_naming_the_file(tmp_path, text, message):
    # One bad xml costs its image only (counted and named), like a corrupt image: not the data set.
    _xml(tmp_path, "a", [("cat", (1, 1, 8, 8), 0)])
    _xml(tmp_path, "b", [("cat", (1, 1, 8, 8), 0)])
    (tmp_path / "Annotations" / "a.xml").write_text(text)
    _split(tmp_path, "train", ["a", "b"])
    src = VocSource(tmp_path, split="train", class_names=["cat"])
    assert [r.file.stem for r in src.records] == ["b"]
    assert dict(src.problems.counts) == {"malformed annotation file": 1}
    assert f"a.xml: {message}" in src.problems.summary() and "image skipped" in src.problems.summary()


def test_malformed_xml_outside_the_split_is_left_out_of_class_discovery(tmp_path):
    _xml(tmp_path, "a", [("cat", (1, 1, 8, 8), 0)])
    (tmp_path / "Annotations" / "other.xml").write_text("<annotation><object>")
    _split(tmp_path, "train", ["a"])
    src = VocSource(tmp_path, split="train")
    assert src.class_names == ["cat"] and len(src) == 1 and len(src.problems) == 0


def test_missing_split_file(tmp_path):
    _xml(tmp_path, "a", [])
    _split(tmp_path, "train", ["a"])  # with no split files at all the split is generated (test_layouts_and_names.py)
    with pytest.raises(DataError, match=r"ImageSets/Main/val.txt: split file not found"):
        VocSource(tmp_path, split="val")


def test_corrupt_image_fails_on_load_naming_the_file(tmp_path):
    _xml(tmp_path, "a", [("cat", (1, 1, 8, 8), 0)])
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    _split(tmp_path, "train", ["a"])
    src = VocSource(tmp_path, split="train")
    assert len(src) == 1
    with pytest.raises(DataError, match="a.jpg: cannot decode image"):
        src.load(0)


@pytest.mark.skipif(not BCCD.is_dir(), reason="shared BCCD data set not present")
def test_bccd_train_split():
    src = VocSource(BCCD, split="train")
    assert len(src) == 205 and src.class_names == ["Platelets", "RBC", "WBC"]
    assert dict(src.problems.counts) == {"empty box": 1}  # BloodImage_00343: a point-sized RBC box
    assert sum(len(r.boxes) for r in src.records) == 2804
    assert all((r.height, r.width) == (480, 640) for r in src.records)
