"""``detkd train`` and ``detkd eval``."""

from __future__ import annotations

import argparse
from pathlib import Path

from detkd.commands._help import FORMAT_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector from a YAML recipe")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=0.02")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="COCO-style evaluation of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="detector checkpoint (.pt)")
    e.add_argument("--data", required=True, help="data set directory or annotation file")
    e.add_argument("--format", default=None, help=FORMAT_HELP)
    e.add_argument("--split", default="val", help="split to evaluate")
    e.add_argument("--size", type=int, default=None, help="evaluation scale (default: the checkpoint's)")
    e.add_argument("--batch-size", type=int, default=8, help="images per batch")
    e.add_argument("--workers", type=int, default=2, help="data loader worker processes (0 = in process)")
    e.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    e.add_argument("--json", default=None, help="write the metrics here (default: CHECKPOINT with suffix .eval.json)")
    e.add_argument(
        "--visualize", type=int, default=0, metavar="N", help="also write PNGs of the first N images' predictions"
    )
    e.add_argument(
        "--compare",
        default=None,
        help="with --visualize: a second checkpoint's panel, e.g. the teacher (default: none)",
    )
    e.add_argument("--vis-dir", default=None, help="with --visualize: folder (default: CHECKPOINT with suffix .vis)")
    e.add_argument("--vis-score", type=float, default=0.3, help="with --visualize: lowest score drawn")
    e.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from detkd.config import load_recipe
    from detkd.runs import train

    recipe = load_recipe(args.recipe, args.overrides)
    metrics = train(recipe, resume=args.resume, progress=not args.no_progress)
    print_summary(metrics, recipe.train.out)
    return 0


def print_summary(metrics: dict, out: str) -> None:
    if not metrics:  # a non-main DDP rank: rank 0 reports
        return
    from detkd.engine.metrics import ap_summary

    print(f"done: {ap_summary(metrics) or 'no evaluation'}  (run directory: {out})")


def run_eval(args: argparse.Namespace) -> int:
    from detkd.engine.metrics import format_table
    from detkd.jsonio import dumps
    from detkd.runs import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        size=args.size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        format=args.format,
        progress=True,
    )
    print(format_table(result))
    out = Path(args.json) if args.json else Path(args.checkpoint).with_suffix(".eval.json")
    out.write_text(dumps(result.to_dict(), indent=2))  # strict JSON: null for undefined metrics
    print(f"metrics written to {out}")
    if args.visualize > 0:
        from detkd.runs import visualize_checkpoint

        images = visualize_checkpoint(
            args.checkpoint,
            args.data,
            count=args.visualize,
            out_dir=args.vis_dir,
            compare=args.compare,
            split=args.split,
            size=args.size,
            device=args.device,
            format=args.format,
            score_thresh=args.vis_score,
        )
        where = images[0].parent if images else args.vis_dir
        print(f"{len(images)} prediction image(s) written to {where} (ground truth | detections, see README.txt there)")
    return 0
