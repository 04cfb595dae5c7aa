"""KittiSource on a training/image_2 + label_2 tree written here: DontCare, splits, bad lines."""

import numpy as np
import pytest
from PIL import Image

from detkd.data.formats.base import stable_image_id
from detkd.data.formats.kitti import ANY_CLASS, KITTI_CLASSES, KittiSource
from detkd.errors import DataError

TAIL = "1.5 1.6 3.9 1.0 1.7 8.4 0.01"  # h w l x y z ry: 3D fields the reader does not use


def _img(path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 30, np.uint8)).save(path)


def _kitti(root, stem, lines, image=True):
    if image:
        _img(root / "training" / "image_2" / f"{stem}.png")
    path = root / "training" / "label_2" / f"{stem}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def test_classes_dontcare_and_scores(tmp_path):
    _kitti(
        tmp_path,
        "000001",
        [
            f"Car 0.00 0 -1.58 1.00 2.00 20.50 23.00 {TAIL}",
            f"Pedestrian 0.00 1 0.21 22.00 3.00 27.00 15.00 {TAIL} 0.93",  # 16 fields: a result file
            "DontCare -1 -1 -10 25.00 5.00 31.00 9.00 -1 -1 -1 -1000 -1000 -1000 -10",
        ],
    )
    _kitti(tmp_path, "000002", [])  # no objects: a negative
    src = KittiSource(tmp_path)
    assert src.class_names == list(KITTI_CLASSES)
    a, b = src.records
    assert a.boxes.tolist() == [[1, 2, 20.5, 23], [22, 3, 27, 15]] and a.labels.tolist() == [1, 4]
    assert a.ignore.tolist() == [[25, 5, 31, 9]] and a.ignore_labels.tolist() == [ANY_CLASS]
    assert a.image_id == stable_image_id("000001") == 2564618502401213
    assert len(b.boxes) == 0 and (b.height, b.width) == (24, 32) and len(src.problems) == 0


def test_bad_lines_and_missing_files_are_counted(tmp_path):
    _kitti(
        tmp_path,
        "000001",
        [
            f"Van 0 0 0 1 1 10 10 {TAIL}",
            "Car 0.0 0 1.0 2.0",  # 5 fields
            f"Car 0 0 0 1 x 10 10 {TAIL}",  # non-numeric box
            f"Spaceship 0 0 0 1 1 5 5 {TAIL}",
            f"Truck 0 0 0 5 5 5 9 {TAIL}",  # zero width
            f"Tram 0 0 0 20 10 40 23 {TAIL}",  # beyond the right edge: clipped
        ],
    )
    _kitti(tmp_path, "000002", [f"Car 0 0 0 1 1 10 10 {TAIL}"], image=False)
    _kitti(tmp_path, "000003", [])
    (tmp_path / "training" / "image_2" / "000003.png").write_bytes(np.random.default_rng(4).bytes(200))
    src = KittiSource(tmp_path)
    (r,) = src.records
    assert r.boxes.tolist() == [[1, 1, 10, 10], [20, 10, 32, 23]] and r.labels.tolist() == [2, 7]
    assert dict(src.problems.counts) == {
        "malformed label line": 2,
        "unknown category": 1,
        "empty box": 1,
        "box outside image": 1,
        "missing image": 1,
        "unreadable image": 1,  # KITTI labels carry no size, so an unreadable header means skip
    }
    assert "000001.txt: line 2: 5 fields, expected 15" in src.problems.summary()


def test_split_files(tmp_path):
    for stem in ("000001", "000002", "000003"):
        _kitti(tmp_path, stem, [f"Car 0 0 0 1 1 10 10 {TAIL}"])
    (tmp_path / "ImageSets").mkdir()
    (tmp_path / "ImageSets" / "val.txt").write_text("000003\n000001\n000009\n")
    val = KittiSource(tmp_path, split="val")
    assert [r.file.stem for r in val.records] == ["000003", "000001"]
    assert dict(val.problems.counts) == {"missing annotation": 1}
    assert len(KittiSource(tmp_path)) == len(KittiSource(tmp_path, split="train")) == 3  # no train.txt: all
    with pytest.raises(DataError, match=r"ImageSets/test.txt: split file not found"):
        KittiSource(tmp_path, split="test")


def test_missing_label_folder_and_unreadable_label_file(tmp_path):
    with pytest.raises(DataError, match=r"training/label_2: KITTI label folder not found"):
        KittiSource(tmp_path)
    _kitti(tmp_path, "000001", [])
    (tmp_path / "training" / "label_2" / "000001.txt").write_bytes(b"Car \xff\xfe\x81")
    with pytest.raises(DataError, match="000001.txt: cannot read annotation file"):
        KittiSource(tmp_path)
