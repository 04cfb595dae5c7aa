"""CocoSource on COCO json written here: remapping, crowd, negatives, every problem kind, fatal files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data.formats.coco import CocoSource
from detkd.data.formats.detect import open_source
from detkd.errors import DataError

CATS = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 12, "name": "bird"}]


def _img(path, w=32, h=24, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _write(root, images, anns, cats=CATS, name="train.json"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / name
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _image(i, name, w=32, h=24):
    return {"id": i, "file_name": name, "width": w, "height": h}


def test_labels_follow_sorted_category_ids_crowd_is_ignore_and_negatives_stay(tmp_path):
    _img(tmp_path / "images" / "a.png")
    _img(tmp_path / "images" / "b.png")
    path = _write(
        tmp_path,
        [_image(40, "a.png"), _image(41, "b.png")],
        [
            {"id": 1, "image_id": 40, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 40, "category_id": 12, "bbox": [0.5, 1.5, 4, 4]},
            {"id": 3, "image_id": 40, "category_id": 3, "bbox": [10, 10, 20, 8], "iscrowd": 1},
        ],
    )
    src = CocoSource(path)
    assert src.class_names == ["cat", "dog", "bird"]  # sorted by category id 3, 7, 12
    assert src.category_ids == {1: 3, 2: 7, 3: 12}
    a, b = src.records
    assert (a.image_id, b.image_id) == (40, 41)
    assert a.file == tmp_path / "images" / "a.png" and (a.height, a.width) == (24, 32)
    assert a.boxes.tolist() == [[1, 2, 11, 7], [0.5, 1.5, 4.5, 5.5]] and a.labels.tolist() == [2, 3]
    assert a.boxes.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert a.ignore.tolist() == [[10, 10, 30, 18]] and a.ignore_labels.tolist() == [1]
    assert b.boxes.shape == (0, 4) and b.labels.tolist() == [] and len(b.ignore) == 0  # a negative, kept
    assert len(src.problems) == 0
    sample = src.load(0)
    assert sample.image.shape == (3, 24, 32) and int(sample.image[1, 5, 5]) == 100


def test_item_problems_are_counted_and_skipped(tmp_path):
    _img(tmp_path / "images" / "a.png")
    _img(tmp_path / "images" / "big.png", w=40, h=30)
    path = _write(
        tmp_path,
        [
            _image(1, "a.png"),
            _image(2, "gone.png"),  # missing image file
            _image(3, "big.png"),  # annotation says 32x24, file is 40x30
            {"id": 4, "file_name": "a.png"},  # no size: taken from the header -> not a problem
            {"file_name": "a.png"},  # no id
        ],
        [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 2, 6, 6]},
            {"id": 11, "image_id": 1, "category_id": 99, "bbox": [2, 2, 6, 6]},  # unknown category
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4]},  # zero width
            {"id": 13, "image_id": 1, "category_id": 7, "bbox": [20, 10, 30, 30]},  # overhangs: clipped
            {"id": 14, "image_id": 1, "category_id": 7, "bbox": [40, 30, 5, 5]},  # wholly outside
            {"id": 15, "image_id": 1, "category_id": 7, "bbox": ["x", 1, 2, 3]},  # malformed
            {"id": 16, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3]},  # malformed
            {"id": 17, "image_id": 555, "category_id": 7, "bbox": [1, 2, 3, 4]},  # no such image
        ],
    )
    src = CocoSource(path)
    assert [r.image_id for r in src.records] == [1, 4]
    a, no_size = src.records
    assert a.boxes.tolist() == [[2, 2, 8, 8], [20, 10, 32, 24]] and a.labels.tolist() == [1, 2]
    assert (no_size.height, no_size.width) == (24, 32)
    assert dict(src.problems.counts) == {
        "missing image": 1,
        "size mismatch": 1,
        "malformed image entry": 1,
        "unknown category": 1,
        "empty box": 2,  # zero width, and the outside box that clips to nothing
        "box outside image": 2,
        "malformed box": 2,
        "annotation without image": 1,
    }
    text = src.problems.summary()
    assert "gone.png: image file not found" in text and "says 32x24 (WxH) but big.png is 40x30" in text


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "annotation file is empty"),
        ("  \n", "annotation file is empty"),
        ('{"images": [{"id": 1, "file_na', "malformed json"),
        ("[]", "not a COCO annotation file"),
        ('{"annotations": []}', "not a COCO annotation file"),
        ('{"images": [], "annotations": [], "categories": []}', "no 'categories'"),
        ('{"images": [], "categories": [{"id": "x", "name": "a"}]}', "integer 'id'"),
        ('{"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}', "id 1 appears twice"),
        ('{"images": [], "annotations": {}, "categories": [{"id": 1, "name": "a"}]}', "'annotations' is not a list"),
    ],
)
def test_fatal_annotation_files_raise_naming_the_file(tmp_path, text, message):
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(DataError, match=f"train.json: .*{message}"):
        CocoSource(path)


def test_missing_and_unreadable_annotation_files(tmp_path):
    with pytest.raises(DataError, match="nope.json: annotation file not found"):
        CocoSource(tmp_path / "nope.json")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DataError, match="bin.json: cannot read annotation file"):
        CocoSource(binary)


def test_duplicate_image_id_is_fatal(tmp_path):
    _img(tmp_path / "images" / "a.png")
    _img(tmp_path / "images" / "b.png")
    path = _write(tmp_path, [_image(1, "a.png"), _image(1, "b.png")], [])
    with pytest.raises(DataError, match="train.json: image id 1 appears twice"):
        CocoSource(path)


def test_corrupt_image_is_kept_and_fails_on_load_naming_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    path = _write(tmp_path, [_image(1, "bad.jpg")], [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}])
    src = CocoSource(path)
    assert len(src) == 1 and len(src.problems) == 0  # the header is unreadable: no size to cross-check
    with pytest.raises(DataError, match="bad.jpg: cannot decode image"):
        src.load(0)


def test_image_dir_defaults_and_explicit(tmp_path):
    # COCO 2017 layout: annotations/instances_train2017.json, images in train2017/.
    _img(tmp_path / "train2017" / "x.png")
    _write(tmp_path, [_image(1, "x.png")], [], name="instances_train2017.json")
    src = open_source(tmp_path, split="train")
    assert src.records[0].file == tmp_path / "train2017" / "x.png" and len(src.problems) == 0
    # A json beside its images/ folder, file names with a sub folder.
    flat = tmp_path / "flat"
    _img(flat / "images" / "val" / "y.png")
    (flat / "val.json").write_text(json.dumps({"images": [_image(2, "val/y.png")], "categories": CATS}))
    assert CocoSource(flat / "val.json").records[0].file == flat / "images" / "val" / "y.png"
    other = tmp_path / "elsewhere"
    _img(other / "val" / "y.png")
    assert CocoSource(flat / "val.json", image_dir=other).records[0].file == other / "val" / "y.png"


def test_fingerprint_is_stable_and_sees_box_changes(tmp_path):
    _img(tmp_path / "images" / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}]
    path = _write(tmp_path, [_image(1, "a.png")], anns)
    first = CocoSource(path).fingerprint()
    assert len(first) == 64 and CocoSource(path).fingerprint() == first
    anns[0]["bbox"] = [1, 1, 4, 5]
    _write(tmp_path, [_image(1, "a.png")], anns)
    assert CocoSource(path).fingerprint() != first
