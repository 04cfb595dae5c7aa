"""``detkd export CHECKPOINT --format torchscript|onnx``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained detector (student only) to TorchScript or ONNX")
    p.add_argument("checkpoint", help="detector checkpoint (.pt)")
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="export format")
    p.add_argument("--size", type=int, default=None, help="inference scale (default: the training scale)")
    p.add_argument("--out", default=None, help="output file (default: next to the checkpoint)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from detkd.models.checkpoint import load_detector
    from detkd.models.export import export_detector
    from detkd.runs import checkpoint_size

    detector, payload = load_detector(args.checkpoint)
    size = args.size or checkpoint_size(payload)
    suffix = ".ts" if args.format == "torchscript" else ".onnx"
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(suffix)
    export_detector(detector, out, fmt=args.format, size=size)
    print(f"exported {args.checkpoint} ({detector.family}/{detector.spec['backbone']}, {size}px) to {out}")
    return 0
