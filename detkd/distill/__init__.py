"""Distillation methods; importing this package registers every built-in method."""

from detkd.distill import cwd, defeat, fgd, fitnet, pkd  # noqa: F401  (registration side effects)
