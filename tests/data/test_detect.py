"""detect_format, list_splits and open_source on minimal layouts of every format."""

import json

import numpy as np
import pytest
from PIL import Image

from detkd.data.formats.cityscapes import CityscapesSource
from detkd.data.formats.coco import CocoSource
from detkd.data.formats.detect import detect_format, list_splits, open_source
from detkd.data.formats.kitti import KittiSource
from detkd.data.formats.voc import VocSource
from detkd.data.formats.yolo import YoloSource
from detkd.errors import ConfigError, DataError


def _img(path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 10, np.uint8)).save(path)


def _coco(root, name="train.json", file_name="a.png"):
    _img(root / "images" / file_name)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images = [{"id": 1, "file_name": file_name, "width": 32, "height": 24}]
    (root / "annotations" / name).write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "x"}]}))


def _voc(root):
    _img(root / "JPEGImages" / "a.jpg")
    (root / "Annotations").mkdir(parents=True)
    box = "<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
    (root / "Annotations" / "a.xml").write_text(f"<annotation><object><name>x</name>{box}</object></annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name in ("train", "val", "x_train"):  # x_train.txt is a per-class file, not a split
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("a\n")


def _yolo(root):
    for split in ("train", "val"):
        _img(root / "images" / split / "a.png")
        (root / "labels" / split).mkdir(parents=True)
    (root / "data.yaml").write_text("names: [x]\n")


def _cityscapes(root):
    _img(root / "leftImg8bit" / "val" / "ulm" / "ulm_1_leftImg8bit.png")
    ann = root / "gtFine" / "val" / "ulm" / "ulm_1_gtFine_polygons.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps({"imgWidth": 32, "imgHeight": 24, "objects": []}))


def _kitti(root):
    _img(root / "training" / "image_2" / "000000.png")
    (root / "training" / "label_2").mkdir(parents=True)
    (root / "training" / "label_2" / "000000.txt").write_text("")


LAYOUTS = [
    ("coco", _coco, CocoSource, ["train"]),
    ("voc", _voc, VocSource, ["train", "val"]),
    ("yolo", _yolo, YoloSource, ["train", "val"]),
    ("cityscapes", _cityscapes, CityscapesSource, ["val"]),
    ("kitti", _kitti, KittiSource, ["all"]),
]


@pytest.mark.parametrize("name, write, cls, splits", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_each_layout_is_recognised_listed_and_opened(tmp_path, name, write, cls, splits):
    write(tmp_path)
    assert detect_format(tmp_path) == name
    assert list_splits(tmp_path, name) == splits
    src = open_source(tmp_path, split=splits[0])
    assert type(src) is cls and src.format_name == name and len(src) == 1 and len(src.problems) == 0


def test_coco_split_names_and_json_file(tmp_path):
    _coco(tmp_path, name="instances_val2017.json")
    _coco(tmp_path, name="instances_train2017.json")
    (tmp_path / "annotations" / "captions_train2017.json").write_text("{}")  # not an instances file
    assert list_splits(tmp_path, "coco") == ["train2017", "val2017"]
    assert len(open_source(tmp_path, split="val")) == 1  # val -> instances_val2017.json
    ann = tmp_path / "annotations" / "instances_train2017.json"
    assert detect_format(ann) == "coco" and list_splits(ann, "coco") == ["instances_train2017"]
    assert open_source(ann, split="ignored for a file").records[0].file == tmp_path / "images" / "a.png"
    with pytest.raises(DataError, match=r"annotations: no annotation file for split 'test'"):
        open_source(tmp_path, split="test")


def test_reader_keywords_pass_through(tmp_path):
    _voc(tmp_path)
    assert open_source(tmp_path, class_names=["x", "y"]).class_names == ["x", "y"]
    yolo = tmp_path / "yolo"
    _yolo(yolo)
    assert open_source(yolo, format="yolo", names=["p", "q"]).class_names == ["p", "q"]


def test_unknown_layouts_say_what_was_looked_for(tmp_path):
    (tmp_path / "images").mkdir()  # images/ alone is not YOLO
    with pytest.raises(DataError, match="cannot tell the data format") as exc:
        detect_format(tmp_path)
    for looked_for in ("annotations/*.json", "Annotations/", "labels/", "gtFine/", "training/label_2/", "--format"):
        assert looked_for in str(exc.value)
    with pytest.raises(DataError, match="nowhere: no such data set directory"):
        detect_format(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: a file, but not a COCO .json"):
        detect_format(tmp_path / "notes.txt")


def test_unknown_format_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown data format 'pascal'; available: cityscapes, coco, kitti"):
        open_source(tmp_path, format="pascal")
    with pytest.raises(ConfigError, match="unknown data format"):
        list_splits(tmp_path, "pascal")
