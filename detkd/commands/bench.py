"""``detkd bench speed`` and ``detkd bench accuracy``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measured speed and accuracy benchmarks")
    bsub = p.add_subparsers(dest="bench_command", metavar="KIND", required=True)

    s = bsub.add_parser("speed", help="stored vs online distillation vs student alone, store size and throughput")
    s.add_argument("--quick", action="store_true", help="CPU scale in a few minutes (fewer images and steps)")
    s.add_argument("--out", default="runs/bench-speed", help="working directory (data, teacher, store)")
    s.add_argument("--json", default=None, help="write the figures to this JSON file (default: OUT/speed.json)")
    s.add_argument("--workers", type=int, default=2, help="data loader workers")
    s.add_argument("--no-progress", action="store_true", help="phase log lines only, no progress bars")
    s.set_defaults(func=run_speed_cmd)

    a = bsub.add_parser("accuracy", help="each method vs the student alone on the same schedule, over seeds")
    a.add_argument("--recipe", required=True, help="student recipe YAML")
    a.add_argument("--teacher", required=True, help="teacher checkpoint (online rows)")
    a.add_argument(
        "--store",
        default=None,
        help="knowledge store (adds stored rows for sparse-capable methods; default: no stored rows)",
    )
    a.add_argument(
        "--selected",
        action="store_true",
        help="also run each method online with the store's cell selection (the stored loss without the store)",
    )
    a.add_argument("--methods", nargs="+", default=["fitnet"], help="methods to compare with the student alone")
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds per row")
    a.add_argument("--out", default="runs/bench-accuracy", help="run directories, accuracy.json and accuracy.md")
    a.add_argument("overrides", nargs="*", help="recipe overrides applied to every run")
    a.set_defaults(func=run_accuracy_cmd)


def run_speed_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detkd.bench.speed import format_results, run_speed, write_results

    results = run_speed(out_dir=args.out, quick=args.quick, workers=args.workers, progress=not args.no_progress)
    print(format_results(results))
    path = args.json or str(Path(args.out) / "speed.json")  # always written; by default under runs/
    write_results(results, path)
    print(f"figures written to {path}")
    return 0


def run_accuracy_cmd(args: argparse.Namespace) -> int:
    from detkd.bench.accuracy import format_table, run_accuracy

    table = run_accuracy(
        recipe=args.recipe,
        teacher=args.teacher,
        store=args.store,
        methods=args.methods,
        seeds=args.seeds,
        out_dir=args.out,
        overrides=args.overrides,
        selected=args.selected,
    )
    from detkd.models.checkpoint import read_checkpoint

    teacher_ap = (read_checkpoint(args.teacher).get("metrics") or {}).get("AP")  # as evaluated when it was saved
    print(format_table(table, teacher_ap=teacher_ap))
    return 0
