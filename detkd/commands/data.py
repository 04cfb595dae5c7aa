"""``detkd data synth`` and ``detkd data inspect``."""

from __future__ import annotations

import argparse

from detkd.commands._help import FORMAT_HELP
from detkd.data.defaults import INPUT_SIZE


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="create or inspect data sets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    s = dsub.add_parser("synth", help="write the deterministic synthetic shapes data set (COCO format)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, default=1000, help="training images")
    s.add_argument("--val", type=int, default=200, help="validation images")
    s.add_argument("--size", type=int, default=INPUT_SIZE, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data set)")
    s.set_defaults(func=run_synth)

    i = dsub.add_parser("inspect", help="recognise a data set's format and report counts and problems")
    i.add_argument("path", help="data set directory or annotation file")
    i.add_argument("--format", default=None, help=FORMAT_HELP)
    i.add_argument("--splits", nargs="*", default=None, help="splits to inspect (default: all found)")
    i.add_argument("--no-decode", action="store_true", help="do not decode every image (faster)")
    i.set_defaults(func=run_inspect)


def run_synth(args: argparse.Namespace) -> int:
    from detkd.data.synthetic import generate_synthetic

    out = generate_synthetic(args.out, num_train=args.train, num_val=args.val, image_size=args.size, seed=args.seed)
    print(f"wrote synthetic data set to {out}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from detkd.data.inspect import format_report, inspect_dataset
    from detkd.errors import DataError

    report = inspect_dataset(args.path, format=args.format, splits=args.splits, decode=not args.no_decode)
    print(format_report(report))
    bad = report.unreadable_annotations()
    if bad:  # exit 2: a script checking a data set must not pass one whose annotations do not parse
        raise DataError(f"{args.path}: annotations that could not be read (see above): " + "; ".join(bad))
    return 0
