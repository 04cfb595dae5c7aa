"""YoloSource on YOLO folders written here: normalised boxes, negatives, names files, bad lines."""

import numpy as np
import pytest
from PIL import Image

from detkd.data.formats.base import stable_image_id
from detkd.data.formats.yolo import YoloSource, read_names
from detkd.errors import DataError


def _img(path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 70, np.uint8)).save(path)


def _labels(root, split, stem, text):
    path = root / "labels" / split / f"{stem}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_normalised_boxes_negatives_and_ids(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [ball, cup]\nnc: 2\n")
    _img(tmp_path / "images" / "train" / "p.png")
    _img(tmp_path / "images" / "train" / "neg.jpg")  # no label file: a negative, not a problem
    _img(tmp_path / "images" / "train" / "empty.png")  # empty label file: a negative too
    _img(tmp_path / "images" / "val" / "p.png")
    _labels(tmp_path, "train", "p", "1 0.5 0.5 0.5 0.5\n\n0 0.25 0.25 0.125 0.25\n")
    _labels(tmp_path, "train", "empty", "")
    src = YoloSource(tmp_path, split="train")
    assert src.class_names == ["ball", "cup"] and len(src.problems) == 0
    empty, neg, p = src.records  # sorted by file name
    assert p.boxes.tolist() == [[8, 6, 24, 18], [6, 3, 10, 9]] and p.labels.tolist() == [2, 1]
    assert (p.height, p.width) == (24, 32)
    assert len(neg.boxes) == 0 and len(empty.boxes) == 0
    assert p.image_id == stable_image_id("p") and neg.image_id == stable_image_id("neg")
    assert YoloSource(tmp_path, split="val").records[0].image_id == p.image_id  # same stem, same id


def test_bad_lines_are_counted_and_skipped(tmp_path):
    (tmp_path / "classes.txt").write_text("ball\ncup\n")
    _img(tmp_path / "images" / "train" / "p.png")
    _labels(
        tmp_path,
        "train",
        "p",
        "0 0.5 0.5 0.25 0.25\n"
        "0 0.5 0.5\n"  # 3 fields
        "0 0.1 0.1 0.1 0.1 0.2 0.2\n"  # a polygon line: 7 fields
        "2 0.5 0.5 0.1 0.1\n"  # class out of range
        "-1 0.5 0.5 0.1 0.1\n"  # class out of range
        "0.5 0.5 0.5 0.1 0.1\n"  # class not an integer
        "1 a 0.5 0.1 0.1\n"  # not a number
        "1 0.5 0.5 0 0.2\n"  # zero width
        "1 0.875 0.5 0.5 0.25\n",  # overhangs the right edge: clipped
    )
    _labels(tmp_path, "train", "orphan", "0 0.5 0.5 0.1 0.1\n")
    src = YoloSource(tmp_path, split="train")
    (r,) = src.records
    assert r.boxes.tolist() == [[12, 9, 20, 15], [20, 9, 32, 15]] and r.labels.tolist() == [1, 2]
    assert dict(src.problems.counts) == {
        "malformed label line": 6,
        "empty box": 1,
        "box outside image": 1,
        "label without image": 1,
    }
    summary = src.problems.summary()
    assert "p.txt: line 2: 3 fields, expected 5" in summary and "p.txt: line 4: class 2 outside 0..1" in summary


def test_names_sources(tmp_path):
    (tmp_path / "data.yaml").write_text("names:\n  1: cup\n  0: ball\n")
    assert read_names(tmp_path) == ["ball", "cup"]
    (tmp_path / "data.yaml").write_text("names: {0: a, 2: c}\n")
    with pytest.raises(DataError, match="data.yaml: 'names' mapping keys must be 0..1"):
        read_names(tmp_path)
    (tmp_path / "data.yaml").write_text("names: [a, b\n")
    with pytest.raises(DataError, match="data.yaml: invalid YAML"):
        read_names(tmp_path)
    (tmp_path / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DataError, match="data.yaml: no 'names'"):
        read_names(tmp_path)
    (tmp_path / "data.yaml").unlink()
    (tmp_path / "obj.names").write_text("x\n\ny\n")
    assert read_names(tmp_path) == ["x", "y"]
    (tmp_path / "obj.names").unlink()
    with pytest.raises(DataError, match="no class names; looked for data.yaml.*obj.names"):
        read_names(tmp_path)


def test_explicit_names_and_missing_split(tmp_path):
    _img(tmp_path / "images" / "train" / "p.png")
    _labels(tmp_path, "train", "p", "2 0.5 0.5 0.5 0.5\n")
    src = YoloSource(tmp_path, split="train", names=["a", "b", "c"])
    assert src.records[0].labels.tolist() == [3] and src.class_names == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"images/val: split folder not found"):
        YoloSource(tmp_path, split="val", names=["a"])


def test_two_images_with_one_stem_are_refused(tmp_path):
    _img(tmp_path / "images" / "train" / "a.png")
    _img(tmp_path / "images" / "train" / "a.jpg")
    with pytest.raises(DataError, match="a.jpg and .*a.png: both have image id"):
        YoloSource(tmp_path, split="train", names=["x"])


def test_corrupt_image_has_no_size_so_it_is_counted_and_skipped(tmp_path):
    _img(tmp_path / "images" / "train" / "good.png")
    (tmp_path / "images" / "train" / "bad.jpg").write_bytes(np.random.default_rng(2).bytes(400))
    src = YoloSource(tmp_path, split="train", names=["x"])
    assert [r.file.name for r in src.records] == ["good.png"]
    assert dict(src.problems.counts) == {"unreadable image": 1}
    assert "bad.jpg: cannot decode image" in src.problems.summary()


def test_unreadable_label_file_is_fatal(tmp_path):
    _img(tmp_path / "images" / "train" / "p.png")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "p.txt").write_bytes(b"\xff\xfe\x81\x00")
    with pytest.raises(DataError, match="p.txt: cannot read annotation file"):
        YoloSource(tmp_path, split="train", names=["x"])
