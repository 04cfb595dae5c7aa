"""Runs: the composition root. A recipe becomes data, models, a teacher source, a task and a trainer here.

Everything below (``distill``, ``store``, ``engine``, ``knowledge``, ``models``, ``data``) is wired
together only in this package; the CLI (``commands``), the Python API and the benchmarks call it.
"""

from detkd.runs.distillation import distill
from detkd.runs.evaluation import checkpoint_size, evaluate_checkpoint, visualize_checkpoint
from detkd.runs.training import train

__all__ = ["checkpoint_size", "distill", "evaluate_checkpoint", "train", "visualize_checkpoint"]
