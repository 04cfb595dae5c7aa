"""(image, view) pairs through the training pipeline, for a store build's teacher pass and bases fit.

Each pair goes through the same ViewedDataset (one fixed view per dataset) and Collate as training,
and comes with what reading it found out: the file's content digest, or why it could not be read.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from detkd.data.formats.base import DetectionSource
from detkd.data.loader import Batch, Collate, ViewedDataset
from detkd.data.sample import ImageRecord
from detkd.data.views import View, ViewPolicy
from detkd.errors import DataError
from detkd.store.content import content_digest


@dataclass(frozen=True)
class FixedView:
    """A picklable view provider that always answers one view (one build pass per view)."""

    view: View

    def __call__(self, record: ImageRecord, rng) -> View:
        return self.view


@dataclass(frozen=True)
class PairRead:
    """What reading one (image, view) pair found out besides the sample: its file's digest, or why it failed."""

    index: int
    view: View
    digest: str | None
    error: str | None


class PairDataset(Dataset):
    """(image index, view) pairs through the training pipeline, one ViewedDataset per view; each item
    comes with a ``PairRead`` (the file is hashed here, in the worker that reads the image anyway)."""

    def __init__(self, source: DetectionSource, pairs: list[tuple[int, View]], views: list[View]) -> None:
        self.pairs = pairs
        self.datasets = {
            v: ViewedDataset(source, ViewPolicy(sizes=(v.size,)), train=False, view_provider=FixedView(v))
            for v in views
        }

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        index, view = self.pairs[i]
        source = self.datasets[view].source
        digest = content_digest(source.records[index].file)  # the file is in the page cache for the decode
        item = self.datasets[view][index]
        error = None
        if item is None:  # ViewedDataset logged and skipped it; ask once more for the reason to record
            try:
                source.load(index)
                error = "could not be read"
            except DataError as exc:
                error = str(exc)
        return item, PairRead(index, view, digest, error)


@dataclass(frozen=True)
class PairCollate:
    """The training Collate for the samples, plus their ``PairRead``s."""

    collate: Collate

    def __call__(self, items: list) -> tuple[Batch, list[PairRead]]:
        return self.collate([item for item, _ in items]), [read for _, read in items]
