"""Distillation methods; importing this package registers every built-in method."""

from detkd.distill import cwd, defeat, fgd, fitnet, gkd, mgd, pkd, ssim, structured  # noqa: F401  (registration)
