"""detkd: knowledge distillation for object detectors, online or from a stored teacher."""

__version__ = "0.1.0"
