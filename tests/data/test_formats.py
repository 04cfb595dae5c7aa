"""Every reader on fixtures written here, malformed input included."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data.formats.detect import detect_format, open_source
from detkd.errors import DataError


def _img(path, w=40, h=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def _coco(root, images, anns, cats=({"id": 3, "name": "cat"}, {"id": 7, "name": "dog"})):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": list(cats)})
    )


def test_coco_crowd_ignore_remap_and_problems(tmp_path):
    for name in ("a.png", "b.png"):
        _img(tmp_path / "images" / name)
    _coco(
        tmp_path,
        [
            {"id": 5, "file_name": "a.png", "height": 30, "width": 40},
            {"id": 6, "file_name": "b.png", "height": 30, "width": 40},
            {"id": 9, "file_name": "missing.png", "height": 30, "width": 40},
        ],
        [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 20, 20], "iscrowd": 1},
            {"id": 3, "image_id": 5, "category_id": 99, "bbox": [0, 0, 5, 5]},
            {"id": 4, "image_id": 6, "category_id": 3, "bbox": [5, 5, 0, 4]},
            {"id": 5, "image_id": 6, "category_id": 3, "bbox": [30, 20, 30, 30]},
        ],
    )
    src = open_source(tmp_path)
    assert src.class_names == ["cat", "dog"] and src.category_ids == {1: 3, 2: 7}
    a, b = src.records
    assert a.image_id == 5 and a.boxes.tolist() == [[1, 2, 11, 7]] and a.labels.tolist() == [2]
    assert a.ignore.tolist() == [[0, 0, 20, 20]] and a.ignore_labels.tolist() == [1]
    assert b.boxes.tolist() == [[30, 20, 40, 30]]  # clipped, counted
    c = src.problems.counts
    assert (c["missing image"], c["unknown category"], c["empty box"], c["box outside image"]) == (1, 1, 1, 1)


@pytest.mark.parametrize("text, message", [("", "empty"), ('{"images": [', "malformed json"), ("[]", "not a COCO")])
def test_coco_fatal_files_name_the_file(tmp_path, text, message):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(text)
    with pytest.raises(DataError, match=f"train.json: .*{message}"):
        open_source(tmp_path)


def test_corrupt_image_fails_on_load_naming_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not an image at all")
    _coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}], [])
    src = open_source(tmp_path)
    with pytest.raises(DataError, match="a.png: cannot decode image"):
        src.load(0)


def _voc(root, objects, size=(40, 30)):
    _img(root / "JPEGImages" / "x1.jpg", *size)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("x1\n")
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "Annotations" / "x1.xml").write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{objs}</annotation>"
    )


def test_voc_difficult_one_based_and_zero_size(tmp_path):
    _voc(tmp_path, [("b", (1, 1, 10, 20), 0), ("a", (5, 5, 15, 15), 1), ("a", (7, 7, 7, 9), 0)])
    assert detect_format(tmp_path) == "voc"
    src = open_source(tmp_path)
    r = src.records[0]
    assert src.class_names == ["a", "b"] and r.boxes.tolist() == [[0, 0, 10, 20]] and r.labels.tolist() == [2]
    assert r.ignore.tolist() == [[4, 4, 15, 15]] and src.problems.counts["empty box"] == 1


def test_voc_malformed_xml_is_counted(tmp_path):
    _voc(tmp_path, [])
    (tmp_path / "Annotations" / "x1.xml").write_text("<annotation><size>")
    src = open_source(tmp_path, class_names=["a"])
    assert len(src) == 0 and src.problems.counts["bad annotation"] == 1
    assert "malformed xml" in src.problems.summary()


def test_yolo_normalised_boxes_and_bad_lines(tmp_path):
    _img(tmp_path / "images" / "train" / "p.png", 40, 20)
    _img(tmp_path / "images" / "train" / "negative.png", 40, 20)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "p.txt").write_text("1 0.5 0.5 0.5 0.5\n0 0.1 0.1\n5 0.5 0.5 0.1 0.1\n")
    (tmp_path / "data.yaml").write_text("names: [x, y]\n")
    assert detect_format(tmp_path) == "yolo"
    src = open_source(tmp_path)
    neg, pos = src.records  # sorted by name
    assert len(neg.boxes) == 0 and pos.boxes.tolist() == [[10, 5, 30, 15]] and pos.labels.tolist() == [2]
    assert src.problems.counts["malformed label line"] == 2


def test_cityscapes_polygons_groups_and_stuff(tmp_path):
    _img(tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png", 40, 30)
    ann = tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_polygons.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(
        json.dumps(
            {
                "imgHeight": 30,
                "imgWidth": 40,
                "objects": [
                    {"label": "car", "polygon": [[2, 3], [12, 3], [12, 9], [2, 9]]},
                    {"label": "persongroup", "polygon": [[20, 10], [30, 20]]},
                    {"label": "road", "polygon": [[0, 0], [39, 29]]},
                ],
            }
        )
    )
    assert detect_format(tmp_path) == "cityscapes"
    src = open_source(tmp_path)
    r = src.records[0]
    assert r.boxes.tolist() == [[2, 3, 13, 10]] and r.labels.tolist() == [3]
    assert r.ignore.tolist() == [[20, 10, 31, 21]] and r.ignore_labels.tolist() == [1]


def test_kitti_dontcare_and_bad_lines(tmp_path):
    _img(tmp_path / "training" / "image_2" / "000001.png", 40, 30)
    (tmp_path / "training" / "label_2").mkdir(parents=True)
    (tmp_path / "training" / "label_2" / "000001.txt").write_text(
        "Car 0.0 0 -1.5 1.0 2.0 20.0 25.0 1 1 1 1 1 1 1\n"
        "DontCare -1 -1 -10 30.0 5.0 39.0 9.0 -1 -1 -1 -1000 -1000 -1000 -10\n"
        "Car 0.0 0 1.0 2.0\n"
        "Spaceship 0 0 0 1 1 5 5 1 1 1 1 1 1 1\n"
    )
    assert detect_format(tmp_path) == "kitti"
    src = open_source(tmp_path)
    r = src.records[0]
    assert r.boxes.tolist() == [[1, 2, 20, 25]] and r.labels.tolist() == [1] and r.ignore.tolist() == [[30, 5, 39, 9]]
    assert src.problems.counts["malformed label line"] == 1 and src.problems.counts["unknown category"] == 1


def test_unknown_layout_says_what_it_looked_for(tmp_path):
    with pytest.raises(DataError, match="cannot tell the data format.*--format"):
        detect_format(tmp_path)


def test_image_modes_decode_to_rgb(tmp_path):
    from detkd.data.images import read_image

    gray = tmp_path / "g.png"
    Image.fromarray(np.full((4, 6), 200, np.uint8), mode="L").save(gray)
    assert read_image(gray).shape == (3, 4, 6) and int(read_image(gray)[0, 0, 0]) == 200
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (6, 4), (0, 0, 0, 0)).save(cmyk)
    assert read_image(cmyk).float().mean() > 240  # CMYK (0,0,0,0) is white
    pal = tmp_path / "p.png"
    Image.new("P", (6, 4), 0).save(pal)
    assert read_image(pal).shape == (3, 4, 6)
    rot = tmp_path / "r.jpg"
    im = Image.new("RGB", (6, 4), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: a 6x4 (WxH) file displays as 4x6
    im.save(rot, exif=exif)
    assert tuple(read_image(rot).shape) == (3, 6, 4)
    assert torch.equal(read_image(rot), read_image(rot))


def test_bccd_reads_when_present():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"
    if not root.is_dir():
        pytest.skip("shared BCCD data not present")
    src = open_source(root, split="train")
    assert len(src) == 205 and src.class_names == ["Platelets", "RBC", "WBC"]
