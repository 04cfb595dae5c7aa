"""``detkd demo``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole story on embedded synthetic data: teacher, student alone, online and stored distillation",
        description=(
            "synthetic data -> teacher -> student alone -> student distilled online (live teacher) ->\n"
            "knowledge store (the teacher runs once) -> student distilled from the store (no teacher).\n"
            "Prints a table (AP x100, wall time, s/epoch, teacher forwards), the store's size, where every\n"
            "file is and a conclusion; writes report.md, demo.png, demo.json and predictions/ in the output\n"
            "folder. Finished runs in the folder are reused; data of another scale is refused."
        ),
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder: data, runs, store, report (default: runs/demo; runs/demo-quick with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny scale: checks that the pipeline runs, its numbers mean nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_cmd)


def run_demo_cmd(args: argparse.Namespace) -> int:
    from detkd.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick, progress=not args.no_progress)
    return 0
