"""Real data as users have it: VOC without split files (flat or standard folders), YOLO class names
from every usual file or the recipe, errors that name what is missing, recipes that detect the format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from detkd.config import load_recipe
from detkd.data.formats.detect import detect_format, list_splits, open_source
from detkd.data.formats.yolo import read_names
from detkd.errors import ConfigError, DataError
from detkd.runs.setup import load_data

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(path)


def _voc_pair(xml_dir: Path, image_dir: Path, stem: str, name: str = "cell") -> None:
    _img(image_dir / f"{stem}.jpg")
    box = "<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
    xml_dir.mkdir(parents=True, exist_ok=True)
    (xml_dir / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.jpg</filename><object><name>{name}</name>{box}</object></annotation>"
    )


def _expected_val(stems: list[str]) -> set[str]:
    """The documented rule, computed independently: SHA-256 of "0:stem" as a fraction >= 0.8 -> val."""
    return {s for s in stems if int.from_bytes(hashlib.sha256(f"0:{s}".encode()).digest()[:8], "big") / 2**64 >= 0.8}


def test_flat_voc_gets_a_seeded_80_20_split(tmp_path):
    stems = [f"img_{i:03d}" for i in range(30)]
    for s in stems:
        _voc_pair(tmp_path, tmp_path, s)
    assert detect_format(tmp_path) == "voc" and list_splits(tmp_path, "voc") == ["train", "val"]
    train, val = open_source(tmp_path, split="train"), open_source(tmp_path, split="val")
    train_stems = {Path(r.file).stem for r in train.records}
    val_stems = {Path(r.file).stem for r in val.records}
    assert val_stems == _expected_val(stems) and 0 < len(val_stems) < len(stems) // 2
    assert train_stems == set(stems) - val_stems
    assert all(Path(r.file).parent == tmp_path for r in train.records)  # images beside the xml
    assert len(open_source(tmp_path, split="trainval")) == len(stems)
    assert train.class_names == ["cell"] and len(train.problems) == 0
    # Same split again (no randomness), and adding images does not move the others.
    _voc_pair(tmp_path, tmp_path, "zzz_new")
    again = {Path(r.file).stem for r in open_source(tmp_path, split="val").records}
    assert again - {"zzz_new"} == val_stems


def test_standard_folders_without_split_files_and_tiny_sets(tmp_path):
    for s in ("a", "b"):
        _voc_pair(tmp_path / "Annotations", tmp_path / "JPEGImages", s)
    assert detect_format(tmp_path) == "voc"
    train, val = open_source(tmp_path, split="train"), open_source(tmp_path, split="val")
    assert len(train) == 1 and len(val) == 1  # two images: neither split is left empty
    assert train.records[0].file.parent == tmp_path / "JPEGImages"


def test_voc_errors_name_the_missing_piece(tmp_path):
    with pytest.raises(DataError, match=r"no VOC annotations; looked for Annotations/\*\.xml .*flat layout"):
        open_source(tmp_path, format="voc")
    _voc_pair(tmp_path / "Annotations", tmp_path / "elsewhere", "a")
    with pytest.raises(DataError, match=r"JPEGImages: image folder not found"):
        open_source(tmp_path, format="voc")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DataError, match=r"generated and is one of train, val, trainval, not 'test'"):
        open_source(tmp_path, format="voc", split="test")
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"Main/val.txt: split file not found \(split files present: train\)"):
        open_source(tmp_path, format="voc", split="val")


def test_yolo_names_from_config_yaml_and_a_precise_error(tmp_path):
    # The public COCO128 export: config.yaml with a names mapping.
    (tmp_path / "config.yaml").write_text(
        "path: ../coco128\ntrain: images/train2017\nnames:\n  0: person\n  1: bicycle\n"
    )
    assert read_names(tmp_path) == ["person", "bicycle"]
    (tmp_path / "config.yaml").write_text("lr0: 0.01\n")  # some other tool's config: not an error by itself
    with pytest.raises(DataError) as exc:
        read_names(tmp_path)
    message = str(exc.value)
    for name in ("data.yaml", "dataset.yaml", "config.yaml", "classes.txt", "obj.names", "data.names"):
        assert name in message
    assert "config.yaml has no 'names'" in message and "names=" not in message  # no option that does not exist
    (tmp_path / "classes.txt").write_text("a\nb\n")
    assert read_names(tmp_path) == ["a", "b"]


def _yolo(root: Path) -> None:
    for split in ("train", "val"):
        _img(root / "images" / split / "a.png")
        (root / "labels" / split).mkdir(parents=True)
        (root / "labels" / split / "a.txt").write_text("1 0.5 0.5 0.25 0.25\n")


def test_recipe_names_for_yolo_and_voc(tmp_path):
    _yolo(tmp_path / "yolo")
    recipe = load_recipe(None, {"data": {"root": str(tmp_path / "yolo"), "names": ["cat", "dog"]}})
    bundle = load_data(recipe)
    assert bundle.train_source.class_names == ["cat", "dog"] and bundle.train_source.records[0].labels.tolist() == [2]
    for s in ("a", "b", "c"):
        _voc_pair(tmp_path / "voc", tmp_path / "voc", s, name="rbc")
    # VOC: the names fix the label order (otherwise sorted names found in the xml).
    source = open_source(tmp_path / "voc", split="trainval", names=["wbc", "rbc"])
    assert source.class_names == ["wbc", "rbc"] and {r.labels.tolist()[0] for r in source.records} == {2}
    with pytest.raises(ConfigError, match="data.names: a coco data set names its own classes"):
        open_source(tmp_path / "nowhere.json", format="coco", names=["x"])


def test_recipes_detect_the_format():
    for path in sorted(CONFIGS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())["data"]
        assert data.get("format", "auto") == "auto", f"{path.name} fixes data.format: {data['format']}"
