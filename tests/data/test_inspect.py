"""inspect_dataset / format_report: counts, sizes, every problem, decode failures, missing splits."""

import json

import numpy as np
import pytest
from PIL import Image

from detkd.data.inspect import format_report, inspect_dataset
from detkd.errors import DataError

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "emu"}]


def _img(path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 60, np.uint8)).save(path)


def _coco_train(root):
    """4 images listed: 2 good (one 40x30), 1 corrupt, 1 missing; 5 boxes, 1 crowd, 1 unknown category."""
    _img(root / "images" / "a.png")
    _img(root / "images" / "b.png", w=40, h=30)
    (root / "images" / "bad.jpg").write_bytes(np.random.default_rng(5).bytes(300))
    images = [
        {"id": 1, "file_name": "a.png", "width": 32, "height": 24},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        {"id": 3, "file_name": "bad.jpg", "width": 32, "height": 24},
        {"id": 4, "file_name": "gone.png", "width": 32, "height": 24},
    ]
    box = [1, 1, 5, 5]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": box},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": box},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": box},
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": box, "iscrowd": 1},
        {"id": 5, "image_id": 3, "category_id": 2, "bbox": box},
        {"id": 6, "image_id": 2, "category_id": 9, "bbox": box},
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS})
    )


def test_counts_sizes_problems_and_decode_failures(tmp_path):
    _coco_train(tmp_path)
    report = inspect_dataset(tmp_path)
    assert report.format == "coco" and report.class_names == ["cat", "dog", "emu"]
    assert report.missing_splits == []
    (s,) = report.splits
    assert s.name == "train" and s.images == 3  # the missing image is skipped
    assert s.boxes_per_class == {"cat": 2, "dog": 2, "emu": 0}
    assert s.boxes_per_image == (0, pytest.approx(4 / 3), 3)
    assert s.ignore_regions == 1
    assert dict(s.sizes) == {(32, 24): 2, (40, 30): 1}
    assert dict(s.problems.counts) == {"missing image": 1, "unknown category": 1}
    assert len(s.decode_failures) == 1 and "bad.jpg: cannot decode image" in s.decode_failures[0]
    assert report.num_problems == 3

    text = format_report(report)
    assert "format coco, 3 classes: cat, dog, emu" in text
    assert "split train: 3 images, 4 boxes, 1 ignore regions" in text
    assert "boxes per class: cat 2, dog 2, emu 0" in text
    assert "boxes per image: min 0, mean 1.33, max 3" in text
    assert "image sizes (WxH): 32x24 (2), 40x30 (1)" in text
    assert "problems: 3" in text and "1 x unreadable image" in text and "gone.png: image file not found" in text


def test_without_decoding_corrupt_images_go_unnoticed(tmp_path):
    _coco_train(tmp_path)
    (s,) = inspect_dataset(tmp_path, decode=False).splits
    assert s.decode_failures == [] and s.num_problems == 2


def test_requested_split_that_is_missing_is_reported_not_fatal(tmp_path):
    _coco_train(tmp_path)
    report = inspect_dataset(tmp_path, splits=["train", "val"])
    assert [s.name for s in report.splits] == ["train"]
    assert len(report.missing_splits) == 1 and report.missing_splits[0].startswith("val: ")
    assert "split not read: val: " in format_report(report)
    with pytest.raises(DataError, match="no split could be read as coco"):
        inspect_dataset(tmp_path, splits=["val", "test"])


def test_all_splits_found_on_disk_and_many_sizes_summarised(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [ball]\n")
    for i in range(6):
        _img(tmp_path / "images" / "train" / f"{i}.png", w=20 + i, h=10 + 2 * i)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "0.txt").write_text("0 0.5 0.5 0.5 0.5\n0 0.5 0.5\n")
    _img(tmp_path / "images" / "val" / "v.png")
    (tmp_path / "labels" / "val").mkdir(parents=True)
    report = inspect_dataset(tmp_path)
    assert report.format == "yolo" and [s.name for s in report.splits] == ["train", "val"]
    train, val = report.splits
    assert train.images == 6 and train.boxes_per_class == {"ball": 1} and val.boxes_per_class == {"ball": 0}
    assert dict(train.problems.counts) == {"malformed label line": 1}
    text = format_report(report)
    assert "image sizes (WxH): 6 distinct, width 20..25, height 10..20" in text
    assert "split val: 1 images, 0 boxes" in text


def test_broken_split_is_reported_beside_the_good_one(tmp_path):
    _coco_train(tmp_path)
    (tmp_path / "annotations" / "val.json").write_text('{"images": [')
    report = inspect_dataset(tmp_path, decode=False)
    assert [s.name for s in report.splits] == ["train"]
    assert "val: " in report.missing_splits[0] and "val.json: malformed json" in report.missing_splits[0]


def test_undetectable_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot tell the data format"):
        inspect_dataset(tmp_path)
