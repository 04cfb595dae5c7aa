"""CityscapesSource on a gtFine/leftImg8bit tree written here: polygons, groups, stuff, problems."""

import json

import numpy as np
import pytest
from PIL import Image

from detkd.data.formats.base import stable_image_id
from detkd.data.formats.cityscapes import CITYSCAPES_CLASSES, CityscapesSource
from detkd.errors import DataError

STEM = "aachen_000000_000019"


def _img(path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 50, np.uint8)).save(path)


def _city(root, stem=STEM, objects=(), size=(32, 24), split="train", city="aachen", image=True, raw=None):
    if image:
        _img(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    ann = root / "gtFine" / split / city / f"{stem}_gtFine_polygons.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    data = {"imgWidth": size[0], "imgHeight": size[1], "objects": list(objects)}
    ann.write_text(raw if raw is not None else json.dumps(data))
    return ann


def test_polygons_groups_and_stuff(tmp_path):
    _city(
        tmp_path,
        objects=[
            {"label": "car", "polygon": [[2, 3], [12, 3], [12, 9], [2, 9]]},
            {"label": "bicycle", "polygon": [[20, 1], [25, 4], [22, 10]]},
            {"label": "persongroup", "polygon": [[14, 10], [20, 20]]},
            {"label": "road", "polygon": [[0, 0], [31, 23]]},  # stuff: passed over silently
            {"label": "sky", "polygon": "junk"},  # stuff, even malformed: not our business
            {"label": "car", "polygon": [[1, 1], [5, 5]], "deleted": 1},
        ],
    )
    src = CityscapesSource(tmp_path, split="train")
    assert src.class_names == list(CITYSCAPES_CLASSES) and len(src.class_names) == 8
    (r,) = src.records
    assert r.boxes.tolist() == [[2, 3, 13, 10], [20, 1, 26, 11]] and r.labels.tolist() == [3, 8]
    assert r.ignore.tolist() == [[14, 10, 21, 21]] and r.ignore_labels.tolist() == [1]
    assert r.image_id == stable_image_id(f"aachen/{STEM}") == 3497284206051317
    assert (r.height, r.width) == (24, 32) and len(src.problems) == 0
    assert src.load(0).image.shape == (3, 24, 32)


def test_item_problems_are_counted_and_skipped(tmp_path):
    _city(
        tmp_path,
        stem="bonn_1",
        city="bonn",
        objects=[
            {"label": "car", "polygon": [[2, 3], [40, 30]]},  # beyond the image: clipped
            {"label": "bus", "polygon": [[2, 3]]},  # one point
            {"label": "truck", "polygon": [["a", 3], [4, 5]]},
        ],
    )
    _city(tmp_path, stem="bonn_2", city="bonn", image=False)
    _city(tmp_path, stem="bonn_3", city="bonn", size=(64, 48))
    src = CityscapesSource(tmp_path, split="train")
    (r,) = src.records
    assert r.boxes.tolist() == [[2, 3, 32, 24]] and r.labels.tolist() == [3]
    assert dict(src.problems.counts) == {
        "box outside image": 1,
        "malformed polygon": 2,
        "missing image": 1,
        "size mismatch": 1,
    }


@pytest.mark.parametrize(
    "raw, message",
    [
        ('{"imgWidth": 32, "imgHeight": 2', "malformed json"),
        ("", "annotation file is empty"),
        ('{"imgWidth": 32, "objects": []}', "not a Cityscapes polygons file"),
        ('{"imgWidth": 32, "imgHeight": 24, "objects": {}}', "'objects' is not a list"),
    ],
)
def test_fatal_json_raises_naming_the_file(tmp_path, raw, message):
    _city(tmp_path, raw=raw)
    with pytest.raises(DataError, match=f"{STEM}_gtFine_polygons.json: {message}"):
        CityscapesSource(tmp_path, split="train")


def test_missing_split_and_corrupt_image(tmp_path):
    _city(tmp_path, objects=[{"label": "car", "polygon": [[2, 3], [5, 6]]}])
    with pytest.raises(DataError, match=r"gtFine/val: split folder not found"):
        CityscapesSource(tmp_path, split="val")
    png = tmp_path / "leftImg8bit" / "train" / "aachen" / f"{STEM}_leftImg8bit.png"
    png.write_bytes(np.random.default_rng(3).bytes(256))
    src = CityscapesSource(tmp_path, split="train")
    assert len(src) == 1  # size is in the json: kept, fails when decoded
    with pytest.raises(DataError, match=f"{STEM}_leftImg8bit.png: cannot decode image"):
        src.load(0)
