"""Data formats are a registry: a format written in this file alone (a JSON-lines layout) is detected,
opened, listed and accepted by a recipe once registered, and gone again afterwards; the built-in
layouts keep their detection order where they overlap."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detkd.config import load_recipe
from detkd.data.formats.base import (
    FORMATS,
    ClassLabels,
    DetectionSource,
    ImageObjects,
    Layout,
    checked_size,
    read_annotation_text,
    register_format,
    stable_image_id,
)
from detkd.data.formats.detect import detect_format, list_splits, open_source
from detkd.data.sample import ProblemLog
from detkd.errors import ConfigError, DataError


class JsonLinesSource(DetectionSource):
    """``root/{split}.jsonl``, one image a line: {"image": file, "objects": [{"class", "box" (xyxy), "crowd"}]}."""

    title = "JSON-lines"
    layouts = (Layout(description="*.jsonl (JSON lines)", matches=lambda root: any(root.glob("*.jsonl")), priority=60),)
    names_keyword = "names"

    @classmethod
    def list_splits(cls, path: Path) -> list[str]:
        return sorted(f.stem for f in path.glob("*.jsonl"))

    def __init__(self, root: str | Path, split: str = "train", names: list[str] | None = None) -> None:
        root, problems = Path(root), ProblemLog()
        lines = [json.loads(ln) for ln in read_annotation_text(root / f"{split}.jsonl").splitlines() if ln.strip()]
        names = names or sorted({o["class"] for line in lines for o in line["objects"]})
        classes = ClassLabels(names, problems=problems, unknown=lambda name: f"class {name!r}, skipped")
        records = []
        for line in lines:
            file = root / line["image"]
            size = checked_size(file, height=None, width=None, problems=problems)
            if size is None:
                continue
            objects = ImageObjects()
            for i, obj in enumerate(line["objects"]):
                label = classes.get(obj["class"], where=f"object {i}", file=file)
                if label is not None:
                    objects.add(obj["box"], label, ignore=obj.get("crowd", False))
            image_id = stable_image_id(line["image"])
            records.append(objects.record(image_id=image_id, file=file, size=size, problems=problems))
        super().__init__(records, names, problems)


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32, 3), 50, np.uint8)).save(path)


def _jsonl(root: Path) -> None:
    _img(root / "a.png")
    _img(root / "b.png")
    lines = [
        {"image": "a.png", "objects": [{"class": "cat", "box": [1, 2, 10, 12]}, {"class": "dog", "box": [3, 3, 9, 9]}]},
        {"image": "b.png", "objects": [{"class": "cat", "box": [0, 0, 8, 8], "crowd": True}]},
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "val.jsonl").write_text(json.dumps(lines[0]) + "\n")


@pytest.fixture
def jsonl_format() -> Iterator[str]:
    register_format("jsonl")(JsonLinesSource)
    try:
        yield "jsonl"
    finally:
        FORMATS.unregister("jsonl")  # other tests never see it


def test_a_format_registered_from_outside_is_detected_opened_and_valid_in_recipes(tmp_path, jsonl_format):
    _jsonl(tmp_path)
    assert detect_format(tmp_path) == "jsonl" and JsonLinesSource.format_name == "jsonl"
    assert list_splits(tmp_path, "jsonl") == ["train", "val"]
    src = open_source(tmp_path, split="train")
    assert type(src) is JsonLinesSource and src.class_names == ["cat", "dog"] and len(src.problems) == 0
    a, b = src.records
    assert a.boxes.tolist() == [[1, 2, 10, 12], [3, 3, 9, 9]] and a.labels.tolist() == [1, 2]
    assert len(b.boxes) == 0 and b.ignore.tolist() == [[0, 0, 8, 8]] and b.ignore_labels.tolist() == [1]
    # data.names reaches the reader through its names_keyword; an unknown class is counted, not fatal.
    named = open_source(tmp_path, split="train", names=["dog"])
    assert named.class_names == ["dog"] and dict(named.problems.counts) == {"unknown category": 2}
    recipe = load_recipe(None, {"data": {"root": str(tmp_path), "format": "jsonl"}})
    assert len(open_source(recipe.data.root, format=recipe.data.format, split=recipe.data.val_split)) == 1

    FORMATS.unregister("jsonl")  # unregistered: nothing of it is left
    assert "jsonl" not in FORMATS
    with pytest.raises(DataError, match="cannot tell the data format") as exc:
        detect_format(tmp_path)
    assert "jsonl" not in str(exc.value)
    with pytest.raises(ConfigError, match="data.format: .*unknown data format 'jsonl'; available: auto, cityscapes"):
        load_recipe(None, {"data": {"root": str(tmp_path), "format": "jsonl"}})
    register_format("jsonl")(JsonLinesSource)  # back, for the fixture's teardown to remove


def test_registered_layouts_join_the_error_and_cannot_take_over_a_builtin_layout(tmp_path, jsonl_format):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"training/label_2/ \(KITTI\); \*\.jsonl \(JSON lines\); \*\.xml beside"):
        detect_format(tmp_path)
    (tmp_path / "labels").mkdir()
    (tmp_path / "train.jsonl").write_text("")
    assert detect_format(tmp_path) == "yolo"  # priority 30 is tried before the new format's 60


def test_a_name_is_registered_once(jsonl_format):
    class Other(JsonLinesSource):
        pass

    with pytest.raises(ValueError, match="data format 'coco' is already registered"):
        register_format("coco")(Other)
    assert Other.format_name == "jsonl"  # inherited, not overwritten by the refused registration


@pytest.mark.parametrize(
    "dirs, expected",
    [
        (["annotations", "Annotations", "JPEGImages"], "coco"),  # needs annotations/*.json (written below)
        (["Annotations", "images", "labels"], "voc"),
        (["images", "labels", "leftImg8bit", "gtFine"], "yolo"),
        (["leftImg8bit", "gtFine", "training/label_2"], "cityscapes"),
        (["training/label_2"], "kitti"),
    ],
)
def test_overlapping_builtin_layouts_keep_their_order(tmp_path, dirs, expected):
    for d in dirs:
        (tmp_path / d).mkdir(parents=True)
    if "annotations" in dirs:
        (tmp_path / "annotations" / "train.json").write_text("{}")
    (tmp_path / "stray.xml").write_text("<annotation/>")  # flat VOC comes last of all
    assert detect_format(tmp_path) == expected
