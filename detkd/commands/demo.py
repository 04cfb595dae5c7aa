"""``detkd demo``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole story on embedded synthetic data: teacher, store, stored distillation")
    p.add_argument("--out", default="runs/demo", help="output directory (data, runs, store, report)")
    p.add_argument("--quick", action="store_true", help="tiny scale (a smoke test, numbers mean nothing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_cmd)


def run_demo_cmd(args: argparse.Namespace) -> int:
    from detkd.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick, progress=not args.no_progress)
    return 0
