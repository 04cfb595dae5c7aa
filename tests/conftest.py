"""Shared fixtures: a tiny on-disk data set and tiny detectors (random weights, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data.formats.base import DetectionSource
from detkd.data.sample import Record
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
        records.append(Record(image_id=i + 1, file=path, height=h, width=w, boxes=boxes, labels=torch.tensor([1, 2])))
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


def write_tiny_recipe(tmp_path: Path, data: Path, out: Path, *, batch_size: int = 2, extra: str = "") -> Path:
    """``tmp_path/r.yaml``: a one-epoch FCOS recipe at 64 px on ``data``, writing its run to ``out``."""
    path = tmp_path / "r.yaml"
    path.write_text(
        f"data: {{root: {data}, sizes: [64], batch_size: {batch_size}, workers: 0}}\n"
        "model: {family: fcos, fpn_channels: 16, head_convs: 1}\n"
        f"train: {{epochs: 1, warmup_iters: 1, out: {out}}}\n" + extra
    )
    return path


@pytest.fixture
def recipe_factory():
    """``recipe_factory(tmp_path, data, out, extra=...)`` -> a tiny one-epoch recipe file (see write_tiny_recipe)."""
    return write_tiny_recipe
