"""The one sample type every data format yields, and the problem log readers fill."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """Annotation of one image, without its pixels.

    boxes are xyxy in original image pixels, labels are contiguous 1..K (0 is background,
    as in torchvision). ``ignore`` holds regions (COCO crowd, VOC difficult) that are neither
    trained on nor counted as misses in evaluation.
    """

    image_id: int
    file: Path
    height: int
    width: int
    boxes: Tensor  # float32 [N, 4]
    labels: Tensor  # int64 [N]
    ignore: Tensor = field(default_factory=lambda: torch.zeros((0, 4)))  # float32 [M, 4]
    ignore_labels: Tensor = field(default_factory=lambda: torch.zeros((0,), dtype=torch.int64))

    @property
    def orig_size(self) -> tuple[int, int]:
        return (self.height, self.width)


@dataclass
class Sample:
    """Decoded image (uint8, CHW, RGB) plus its annotation."""

    image: Tensor
    record: ImageRecord

    @property
    def boxes(self) -> Tensor:
        return self.record.boxes

    @property
    def labels(self) -> Tensor:
        return self.record.labels

    @property
    def image_id(self) -> int:
        return self.record.image_id

    @property
    def orig_size(self) -> tuple[int, int]:
        return self.record.orig_size


@dataclass
class ProblemLog:
    """Every problem a reader met: counted by kind, with the first examples kept verbatim."""

    max_examples: int = 20
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, file: str | Path, message: str) -> None:
        self.counts[kind] += 1
        text = f"{file}: {message}"
        if len(self.examples) < self.max_examples:
            self.examples.append(text)
        log.debug(text)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no problems found"
        lines = [f"{n} x {kind}" for kind, n in self.counts.most_common()]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)
