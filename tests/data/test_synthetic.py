"""The synthetic shapes data set: byte-identical per seed, valid COCO, tight boxes, and hard enough."""

import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detkd.data.synthetic import SYNTH_CLASSES, generate_synthetic, render_image


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def _by_image(coco: dict) -> dict[int, list[dict]]:
    out = defaultdict(list)
    for a in coco["annotations"]:
        out[a["image_id"]].append(a)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth"), num_train=60, num_val=8, seed=0)


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path, dataset):
    a = generate_synthetic(tmp_path / "a", num_train=60, num_val=8, seed=0)
    b = generate_synthetic(tmp_path / "b", num_train=60, num_val=8, seed=0, workers=2)  # parallel: same bytes
    c = generate_synthetic(tmp_path / "c", num_train=60, num_val=8, seed=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 60 + 8 + 3  # images, two annotation files, README
    assert fa == fb == _files(dataset)
    assert fa.keys() == fc.keys()
    differing = [k for k in fa if k.endswith(".png") and fa[k] != fc[k]]
    assert len(differing) == 68
    assert _load(a, "train") != _load(c, "train")


def test_image_is_independent_of_generation_order():
    # every image has its own random stream: rendering 5 alone equals rendering it after 0..4
    for i in range(5):
        render_image(3, "train", i)
    late, late_objs = render_image(3, "train", 5)
    alone, alone_objs = render_image(3, "train", 5)
    assert np.array_equal(late, alone) and [o.box for o in late_objs] == [o.box for o in alone_objs]
    # and the splits are different streams
    assert not np.array_equal(render_image(3, "val", 5)[0], alone)


def test_layout_and_readme(dataset):
    assert sorted(p.name for p in (dataset / "images" / "val").iterdir())[:2] == ["000001.png", "000002.png"]
    readme = (dataset / "README.txt").read_text()
    assert "detkd" in readme and "seed=0" in readme and "train=60" in readme and "val=8" in readme
    assert "icence" in readme


def test_coco_json_is_valid(dataset):
    for split, count in (("train", 60), ("val", 8)):
        coco = _load(dataset, split)
        assert [c["name"] for c in coco["categories"]] == list(SYNTH_CLASSES)
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5, 6]
        images = {im["id"]: im for im in coco["images"]}
        assert len(images) == len(coco["images"]) == count
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for im in coco["images"]:
            assert im["file_name"].startswith(f"{split}/")
            with Image.open(dataset / "images" / im["file_name"]) as pil:
                assert pil.size == (im["width"], im["height"]) == (128, 128) and pil.mode == "RGB"
        for a in coco["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
            assert 1 <= a["category_id"] <= len(SYNTH_CLASSES)
    used = Counter(a["category_id"] for a in _load(dataset, "train")["annotations"])
    assert set(used) == set(range(1, len(SYNTH_CLASSES) + 1))


def _background_colour(image: np.ndarray) -> np.ndarray:
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()]


def test_boxes_tight_around_drawn_pixels_without_clutter(tmp_path):
    root = generate_synthetic(tmp_path, num_train=40, num_val=0, seed=5, clutter=False)
    coco = _load(root, "train")
    anns = _by_image(coco)
    singles = 0
    for im in coco["images"]:
        image = np.asarray(Image.open(root / "images" / im["file_name"]))
        fg = (image != _background_colour(image)).any(axis=2)  # flat background: fg == object pixels
        boxes = [[int(c) for c in a["bbox"]] for a in anns[im["id"]]]
        covered = np.zeros_like(fg)
        for x, y, w, h in boxes:
            covered[y : y + h, x : x + w] = True
            # tight: every side of the box has a drawn pixel on it
            assert fg[y, x : x + w].any() and fg[y + h - 1, x : x + w].any()
            assert fg[y : y + h, x].any() and fg[y : y + h, x + w - 1].any()
        assert not (fg & ~covered).any()  # nothing drawn outside the boxes
        if len(boxes) == 1:
            singles += 1
            ys, xs = np.nonzero(fg)
            assert boxes[0] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert anns[im["id"]][0]["area"] == fg.sum()
        if not boxes:
            assert not fg.any()
    assert singles >= 1


def test_render_masks_match_boxes_and_background():
    for i in range(15):
        image, objects = render_image(2, "val", i, clutter=False)
        fg = (image != _background_colour(image)).any(axis=2)
        union = np.zeros(fg.shape, dtype=bool)
        for o in objects:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert o.area == o.mask.sum()
            assert not (union & o.mask).any()  # each pixel shows one object
            union |= o.mask
        assert np.array_equal(fg, union)


def test_difficulty_statistics(dataset):
    coco = _load(dataset, "train")
    anns = _by_image(coco)
    sizes = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert sizes.min() <= 8 and sizes.max() >= 45  # small and large objects
    assert (sizes < 16).mean() > 0.2 and (sizes > 32).mean() > 0.08
    counts = [len(anns[im["id"]]) for im in coco["images"]]
    assert 0 in counts and max(counts) >= 10  # empty images and crowded ones
    assert 4 <= np.mean(counts) <= 8

    def overlap(a, b):
        ax, ay, aw, ah = a["bbox"]
        bx, by, bw, bh = b["bbox"]
        return min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)

    with_overlap = sum(any(overlap(a, b) for a, b in itertools.combinations(v, 2)) for v in anns.values())
    assert with_overlap >= 10
    # boxes differ in aspect (rotation and aspect variation)
    aspects = np.array([a["bbox"][2] / a["bbox"][3] for a in coco["annotations"] if max(a["bbox"][2:]) >= 20])
    assert aspects.min() < 0.7 and aspects.max() > 1.4


def test_clutter_and_colour_do_not_give_the_class_away():
    fills = defaultdict(list)
    low_contrast = 0
    distractor_images = 0
    for i in range(40):
        image, objects = render_image(0, "train", i, clutter=False)
        bg = _background_colour(image).astype(int)
        for o in objects:
            colour = image[o.mask].astype(int)
            assert (colour == colour[0]).all()  # flat fill without clutter
            fills[o.label].append(colour[0])
            low_contrast += np.abs(colour[0] - bg).max() < 45
        cluttered, objs = render_image(0, "train", i)
        drawn = np.zeros(cluttered.shape[:2], dtype=bool)
        for o in objs:
            drawn |= o.mask
        # textured background + distractors: many distinct colours outside the objects
        distractor_images += len(np.unique(cluttered[~drawn], axis=0)) > 2000
    assert low_contrast >= 5
    assert distractor_images >= 36
    for label, colours in fills.items():
        spread = np.ptp(np.stack(colours), axis=0)
        assert (spread > 150).all(), f"class {SYNTH_CLASSES[label - 1]} has a narrow colour range"


def test_image_size_is_a_parameter(tmp_path):
    root = generate_synthetic(tmp_path, num_train=3, num_val=1, image_size=64, seed=0)
    coco = _load(root, "train")
    assert {(im["height"], im["width"]) for im in coco["images"]} == {(64, 64)}
    with Image.open(root / "images" / coco["images"][0]["file_name"]) as pil:
        assert pil.size == (64, 64)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert x + w <= 64 and y + h <= 64


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic(tmp_path, num_train=1, num_val=0, image_size=8)
    with pytest.raises(ValueError, match="num_train"):
        generate_synthetic(tmp_path, num_train=-1, num_val=0)
