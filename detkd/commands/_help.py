"""Torch-free help for the CLI: the parser class every (sub)command uses and the method list.

Building the parser must stay cheap (``detkd --help`` in well under a second), so nothing here may
import torch or the method modules. ``METHOD_DESCRIPTIONS`` is a static copy of
``detkd.distill.base.describe_methods()``; tests/commands/test_help.py keeps the two equal.
"""

from __future__ import annotations

import argparse

# The built-in data formats (detkd.data.formats; tests/commands/test_help.py keeps the list equal).
BUILTIN_FORMATS = ("cityscapes", "coco", "kitti", "voc", "yolo")
FORMAT_HELP = f"data format: {', '.join(BUILTIN_FORMATS)} or one you registered (default: detect from the files)"

# (name, one line) for every registered distillation method, in registry (sorted) order.
METHOD_DESCRIPTIONS: list[tuple[str, str]] = [
    ("cwd", "Channel-wise distillation: KL(teacher || student) between per-channel spatial softmax maps."),
    ("defeat", "DeFeat: decoupled foreground/background feature MSE with ground-truth box masks (needs boxes)."),
    (
        "fgd",
        "FGD: focal (box fg/bg, teacher attention) + attention + global (GcBlock) feature distillation; needs boxes.",
    ),
    (
        "fitnet",
        "FitNet hint loss: MSE between adapted student and teacher features per level (dense or stored cells).",
    ),
    ("gkd", "GKD-BMFI: teacher Grad-CAM-weighted feature imitation plus box-aware fine and coarse imitation."),
    ("mgd", "MGD: the student's aligned map, randomly masked, must regenerate the teacher's map."),
    (
        "pkd",
        "PKD: MSE of per-channel standardised student and teacher features (1 - Pearson r), dense or stored cells.",
    ),
    ("ssim", "SSIM KD: (1 - SSIM) / 2 between min-max normalised student and teacher maps per level."),
    (
        "structured",
        "Structured KD: attention-masked imitation, attention transfer and non-local relation distillation.",
    ),
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs verbatim; every option's help ends with its default.

    An option whose help already says "default" (e.g. "default: the checkpoint's") keeps its own
    wording; flags (store_true) and required options show no default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def shows_default(action: argparse.Action) -> bool:
    """True for the options whose help must name a default (not positionals, flags, --help or required ones)."""
    if action.default is argparse.SUPPRESS or action.required or action.nargs == 0:
        return False  # --help, --version, store_true flags, required options
    return bool(action.option_strings)


class Parser(argparse.ArgumentParser):
    """ArgumentParser with ``HelpFormatter``; ``add_subparsers`` passes the class on to subcommands."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
