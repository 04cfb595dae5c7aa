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
    s.add_argument(
        "--method",
        default="fitnet",
        help="distillation method measured (fitnet/pkd train from an nms-ksd store, the others from lowrank)",
    )
    s.add_argument("--rank", type=int, default=None, help="lowrank store: coefficients per cell (default 16)")
    s.add_argument(
        "--value-dtype",
        choices=["float16", "int8", "int4", "int2"],
        default=None,
        help="stored values (default int4; int2: lowrank only)",
    )
    s.add_argument(
        "--budget-kb",
        type=float,
        default=None,
        help="lowrank store fitted to this many KB per image-view at COCO scale, as store build (default: none)",
    )
    s.add_argument(
        "--levels", nargs="+", default=None, help="store and distill only these levels, e.g. p3 (default: all)"
    )
    s.add_argument("--gpu", action="store_true", help="GPU scale on CUDA: R50/FPN-256 teacher, 800 px, batch 16, AMP")
    s.set_defaults(func=run_speed_cmd)

    g = bsub.add_parser("gpu", help="the CUDA/AMP path checked and the store's speed-up measured on one GPU")
    g.add_argument("--cpu", action="store_true", help="dry run of the same code paths at a toy scale on the CPU")
    g.add_argument("--json", default=None, help="report file (default benchmarks/results/gpu.json; --cpu: in --out)")
    g.add_argument("--out", default="runs/bench-gpu", help="working directory (data, runs, stores)")
    g.add_argument(
        "--parts",
        nargs="+",
        choices=["amp", "torchrun", "speed"],
        default=["amp", "torchrun", "speed"],
        help="which parts to run",
    )
    g.set_defaults(func=run_gpu_cmd)

    a = bsub.add_parser("accuracy", help="each method vs the student alone on the same schedule, over seeds")
    a.add_argument("--recipe", required=True, help="student recipe YAML")
    a.add_argument("--teacher", required=True, help="teacher checkpoint (online rows)")
    a.add_argument(
        "--teacher-runs",
        nargs="+",
        default=None,
        metavar="CKPT",
        help="the teacher's recipe trained at other seeds: their APs join the distilling teacher's in a "
        "teacher row with its own seed spread (default: the teacher's AP alone)",
    )
    a.add_argument(
        "--store",
        nargs="+",
        default=None,
        metavar="[METHOD=]STORE",
        help="knowledge store(s) adding a stored row per method: one for every method, and/or METHOD=STORE "
        "for one method (e.g. gkd=stores/with-importance); default: no stored rows",
    )
    a.add_argument(
        "--selected",
        action="store_true",
        help="also run each method online with the store's cell selection (the stored loss without the store)",
    )
    a.add_argument(
        "--methods",
        nargs="+",
        default=["fitnet"],
        help="METHOD or METHOD:WEIGHT (WEIGHT: auto, paper or a number), e.g. ssim ssim:paper",
    )
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds per row")
    a.add_argument("--out", default="runs/bench-accuracy", help="run directories (reused: a rerun resumes)")
    a.add_argument(
        "--json",
        default=None,
        help="also write the results JSON here (command, commit, date, machine, AP x100 per seed; default: none)",
    )
    a.add_argument(
        "--reuse",
        default=None,
        metavar="RESULTS_JSON",
        help="take the student and online rows from this earlier results file instead of training them "
        "(refused unless same recipe, overrides, seeds and teacher); the new file names it as their source "
        "(default: none, every row is trained)",
    )
    a.add_argument(
        "--only",
        nargs="+",
        choices=["student", "online", "stored", "selected"],
        default=None,
        help="train only these rows (e.g. to split a benchmark over processes); the other rows are read "
        "from their finished runs in --out, and rows with none are left out (default: train every row)",
    )
    a.add_argument("overrides", nargs="*", help="recipe overrides applied to every run")
    a.set_defaults(func=run_accuracy_cmd)

    r = bsub.add_parser("readme", help="regenerate README's results tables from benchmarks/results/*.json")
    r.add_argument("--readme", default="README.md", help="README to update (default: README.md)")
    r.add_argument("--results", default="benchmarks/results", help="results directory (default: benchmarks/results)")
    r.add_argument("--check", action="store_true", help="only report tables that are out of date (exit 1)")
    r.set_defaults(func=run_readme_cmd)


def run_speed_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detkd.bench.speed import format_results, gpu_scale, run_speed, store_policy_for, write_results

    extra = {"scale": gpu_scale(), "device": "cuda"} if args.gpu else {}
    results = run_speed(
        out_dir=args.out,
        quick=args.quick,
        workers=args.workers,
        method=args.method,
        progress=not args.no_progress,
        store_policy=store_policy_for(
            args.method, rank=args.rank, value_dtype=args.value_dtype, budget_kb=args.budget_kb, levels=args.levels
        ),
        **extra,
    )
    print(format_results(results))
    path = args.json or str(Path(args.out) / "speed.json")  # always written; by default under runs/
    write_results(results, path)
    print(f"figures written to {path}")
    return 0


def run_gpu_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detkd.bench.gpu import format_report, run_gpu_check

    default = Path(args.out) / "gpu-cpu.json" if args.cpu else Path("benchmarks/results/gpu.json")
    out_json = Path(args.json) if args.json else default
    report = run_gpu_check(out_json=out_json, work_dir=args.out, cpu=args.cpu, parts=tuple(args.parts))
    print(format_report(report))
    print(f"report written to {out_json}")
    return 0 if report["passed"] else 1


def recipe_overrides_out_of(values: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """Split recipe overrides (``data.root=PATH``: a dotted key) off a list option that swallowed them:
    ``--methods cwd data.root=x`` means the method cwd and the override, as a reader expects."""
    if not values:
        return values, []
    dotted = [v for v in values if "." in v.partition("=")[0] and v.partition("=")[1]]
    return [v for v in values if v not in dotted], dotted


def run_accuracy_cmd(args: argparse.Namespace) -> int:
    from detkd.bench.accuracy import format_table, run_accuracy

    swallowed = []
    for option in ("methods", "store"):
        kept, dotted = recipe_overrides_out_of(getattr(args, option))
        setattr(args, option, kept)
        swallowed += dotted
    args.overrides = list(args.overrides or []) + swallowed
    stores = None
    if args.store:
        stores = {}
        for item in args.store:
            method, sep, path = item.partition("=")
            stores[method if sep else "*"] = path if sep else item
        if list(stores) == ["*"]:
            stores = stores["*"]
    table = run_accuracy(
        recipe=args.recipe,
        teacher=args.teacher,
        store=stores,
        methods=args.methods,
        seeds=args.seeds,
        out_dir=args.out,
        overrides=args.overrides,
        selected=args.selected,
        json_path=args.json,
        reuse=args.reuse,
        only=args.only,
        teacher_runs=args.teacher_runs,
    )
    from detkd.models.checkpoint import read_checkpoint

    teacher_ap = (read_checkpoint(args.teacher).get("metrics") or {}).get("AP")  # as evaluated when it was saved
    print(format_table(table, teacher_ap=teacher_ap))
    if args.json:
        print(f"results written to {args.json}")
    return 0


def run_readme_cmd(args: argparse.Namespace) -> int:
    from detkd.bench.tables import update_readme

    stale = update_readme(args.readme, args.results, check=args.check)
    if args.check and stale:
        print(f"{args.readme}: tables out of date for {', '.join(stale)}; run `detkd bench readme`")
        return 1
    print(f"{args.readme}: {'up to date' if not stale else 'updated ' + ', '.join(stale)}")
    return 0
