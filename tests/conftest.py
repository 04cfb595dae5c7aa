"""Shared fixtures: tiny data sets, tiny detectors and checkpoints (random weights, no downloads), tiny
recipes. Tests reach detkd's runs through ``detkd.api`` and the CLI, so these helpers do too where they can."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detkd import api
from detkd.cli import main
from detkd.data.formats.base import DetectionSource
from detkd.data.sample import ImageRecord
from detkd.models.builders import DetectorSpec

CLASSES = ["square", "bar"]


def make_tiny_source(root: Path, *, n: int = 6, size: tuple[int, int] = (48, 64), seed: int = 0) -> DetectionSource:
    """``n`` images with one bright square (label 1) and one bar (label 2) each, boxes exact."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    h, w = size
    records = []
    for i in range(n):
        img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        x0, y0 = int(rng.integers(2, w // 2 - 12)), int(rng.integers(2, h - 18))
        img[y0 : y0 + 14, x0 : x0 + 14] = (230, 40, 40)
        bx, by = int(rng.integers(w // 2, w - 8)), int(rng.integers(2, h - 26))
        img[by : by + 22, bx : bx + 5] = (40, 220, 40)
        path = root / f"{i:03d}.png"
        Image.fromarray(img).save(path)
        boxes = torch.tensor([[x0, y0, x0 + 14, y0 + 14], [bx, by, bx + 5, by + 22]], dtype=torch.float32)
        records.append(
            ImageRecord(image_id=i + 1, file=path, height=h, width=w, boxes=boxes, labels=torch.tensor([1, 2]))
        )
    return DetectionSource(records, CLASSES)


@pytest.fixture
def tiny_source(tmp_path: Path) -> DetectionSource:
    return make_tiny_source(tmp_path / "images")


def tiny_spec(family: str = "fcos", **kw) -> DetectorSpec:
    base = dict(
        family=family,
        backbone="resnet18",
        num_classes=len(CLASSES),
        fpn_channels=16,
        head_convs=1,
        anchor_size=16 if family != "fcos" else None,
        box_head_dim=32,
    )
    base.update(kw)
    return DetectorSpec(**base)


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run beside other work on small machines; one intra-op thread keeps timings stable.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def spec_factory():
    """``spec_factory("retinanet", fpn_channels=32)`` -> a tiny DetectorSpec."""
    return tiny_spec


@pytest.fixture
def source_factory():
    """``source_factory(root, n=8)`` -> a tiny DetectionSource written under root."""
    return make_tiny_source


def write_tiny_recipe(
    tmp_path: Path,
    data: Path,
    out: Path,
    *,
    batch_size: int = 2,
    epochs: int = 1,
    data_keys: str = "",
    train_keys: str = "",
    extra: str = "",
    name: str = "r.yaml",
) -> Path:
    """``tmp_path/name``: an ``epochs``-epoch FCOS recipe (FPN-16, one head conv) at 64 px on ``data``,
    writing its run to ``out``. ``data_keys`` / ``train_keys`` add keys to those sections (YAML flow
    text such as ``"log_every: 1"``); ``extra`` appends whole sections (``"distill: {...}\\n"``)."""
    more_data = f", {data_keys}" if data_keys else ""
    more_train = f", {train_keys}" if train_keys else ""
    path = tmp_path / name
    path.write_text(
        f"data: {{root: {data}, sizes: [64], batch_size: {batch_size}, workers: 0{more_data}}}\n"
        "model: {family: fcos, fpn_channels: 16, head_convs: 1}\n"
        f"train: {{epochs: {epochs}, warmup_iters: 1{more_train}, out: {out}}}\n" + extra
    )
    return path


@pytest.fixture
def recipe_factory():
    """``recipe_factory(tmp_path, data, out, extra=...)`` -> a tiny recipe file (see write_tiny_recipe)."""
    return write_tiny_recipe


@pytest.fixture(scope="session")
def synth_factory(tmp_path_factory):
    """``synth_factory(train=8, val=4)`` -> a ``detkd data synth`` data set (COCO layout, 64 px, six shape
    classes), written once per session and shared between tests: copy it before changing it."""
    made: dict[tuple[int, int], Path] = {}

    def make(train: int = 8, val: int = 4) -> Path:
        if (train, val) not in made:
            out = tmp_path_factory.mktemp(f"synth-{train}-{val}") / "shapes"
            argv = ["data", "synth", "--out", str(out), "--train", str(train), "--val", str(val), "--size", "64"]
            assert main(argv) == 0
            made[train, val] = out
        return made[train, val]

    return make


@pytest.fixture(scope="session")
def synth(synth_factory) -> Path:
    """The shared synthetic data set with 8 training and 4 validation images (see synth_factory)."""
    return synth_factory(8, 4)


@pytest.fixture(scope="session")
def small_synth(synth_factory) -> Path:
    """The shared synthetic data set with 4 training and 2 validation images (see synth_factory)."""
    return synth_factory(4, 2)


def write_random_checkpoint(
    path: Path, class_names: Sequence[str], *, seed: int = 0, extra: dict | None = None, **spec
) -> Path:
    """A detkd checkpoint of a random-weight FCOS (ResNet-18, FPN-16, one head conv) for ``class_names``:
    a teacher or a model to load without training one. ``spec`` overrides DetectorSpec fields."""
    fields = dict(family="fcos", backbone="resnet18", num_classes=len(class_names), fpn_channels=16, head_convs=1)
    fields.update(spec)
    torch.manual_seed(seed)
    detector = api.build_detector(api.DetectorSpec(**fields))
    api.save_checkpoint(path, detector, class_names=list(class_names), extra=extra)
    return Path(path)


@pytest.fixture
def checkpoint_factory():
    """``checkpoint_factory(path, class_names, extra={...})`` -> a random-weight checkpoint (see
    write_random_checkpoint)."""
    return write_random_checkpoint


def strict_json_loads(text: str):
    """json.loads that refuses NaN / Infinity, as JavaScript, jq and most other parsers do."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def strict_json():
    """``strict_json(text)`` -> the parsed JSON; ValueError on NaN / Infinity (see strict_json_loads)."""
    return strict_json_loads


SUMMARY_LABELS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "VOC mAP@0.5": "voc_map50"}


def parse_done_lines(text: str) -> list[tuple[dict[str, float | None], str]]:
    """The ``done: AP (x100): AP 6.3, AP50 12.1, ...  (run directory: DIR)`` lines a train or distill
    command prints: for each, the metrics shown (x100; None for n/a) and the run directory."""
    found = []
    for m in re.finditer(r"^done: AP \(x100\): (.*)  \(run directory: (.*)\)$", text, flags=re.MULTILINE):
        shown = dict(item.rsplit(" ", 1) for item in m.group(1).split(", "))
        found.append(({SUMMARY_LABELS[k]: None if v == "n/a" else float(v) for k, v in shown.items()}, m.group(2)))
    return found


@pytest.fixture
def done_lines():
    """``done_lines(stdout)`` -> [(metrics x100, run directory)] of its summary lines (see parse_done_lines)."""
    return parse_done_lines
