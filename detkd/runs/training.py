"""``detkd train``: a detector trained on its detection loss alone."""

from __future__ import annotations

from detkd.config import Recipe
from detkd.engine.tasks import DetectionTask
from detkd.runs.setup import fit_task, setup_run


def train(recipe: Recipe, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train a detector from a recipe; returns the last epoch's metrics."""
    setup = setup_run(recipe)
    return fit_task(
        setup,
        DetectionTask(setup.student),
        run_info={"kind": "train"},
        resume=resume,
        progress=progress,
        stop_after=stop_after,
    )
