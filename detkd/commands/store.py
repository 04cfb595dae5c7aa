"""``detkd store build | plan | merge | info | verify``."""

from __future__ import annotations

import argparse

from detkd.commands._help import FORMAT_HELP

LEVELS_HELP = (
    "store only these teacher levels, e.g. p3 (the bytes go to the levels a method gains from; runs from the "
    "store distill them by default; default: every level)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="build and inspect knowledge stores (the teacher runs once)")
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    b = ssub.add_parser("build", help="run the teacher over the training set and store its selected knowledge")
    b.add_argument("--teacher", required=True, help="teacher checkpoint")
    b.add_argument("--data", required=True, help="data set directory or annotation file")
    b.add_argument("--format", default=None, help=FORMAT_HELP)
    b.add_argument("--split", default="train", help="split the teacher runs over")
    b.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=None,
        help="training scale(s): longer image side (default: the size(s) the teacher was trained at)",
    )
    b.add_argument(
        "--policy",
        default="nms-ksd",
        help="selection policy: nms-ksd (feature peaks, for fitnet/pkd), lowrank (whole maps as low-rank "
        "coefficients, for every method), dense, detections (or a registered selector)",
    )
    b.add_argument("--per-level", default="", help="per-level policy overrides, e.g. p6=dense,p7=dense (default: none)")
    b.add_argument(
        "--top-k", default=None, help="cells kept per level: one number or p3=48,p4=24,... (default: 384 // stride)"
    )
    b.add_argument(
        "--density",
        type=float,
        default=None,
        help="cap cells per level at this fraction of valid cells (default: no cap)",
    )
    b.add_argument("--kernel", type=int, default=3, help="NMS window (k x k)")
    b.add_argument("--threshold", type=float, default=0.0, help="relative saliency threshold")
    b.add_argument(
        "--channel-group",
        type=int,
        default=None,
        help="grouped channel max pooling C -> C/r, 1 = off (default: 4; 1 for lowrank)",
    )
    b.add_argument("--rank", type=int, default=None, help="lowrank: coefficients kept per cell (default 16)")
    b.add_argument(
        "--level-rank",
        default="",
        help="lowrank: another rank for these levels, e.g. p4=12,p5=12 (p3 holds 3/4 of the cells; default: none)",
    )
    b.add_argument(
        "--budget-kb",
        type=float,
        default=None,
        help="lowrank: instead of --rank, the most KB (1024 B) one image-view's record may take at COCO scale "
        "(1333x800); the build picks int2 or int4 (unless --value-dtype says) and each level's rank from the "
        "teacher's fitted spectra, keeping the most variance per cell (default: none, --rank decides)",
    )
    b.add_argument("--levels", nargs="+", default=None, help=LEVELS_HELP)
    b.add_argument(
        "--pool",
        default="",
        help="lowrank: keep these levels' coefficient maps at 1/k resolution, e.g. p3=2,p4=2 (k x k means, "
        "bytes / k^2; default: none)",
    )
    b.add_argument(
        "--fit-views",
        type=int,
        default=256,
        help="lowrank: image views the per-level bases are fitted on (default 256)",
    )
    b.add_argument(
        "--value-dtype",
        choices=["float16", "int8", "int4", "int2"],
        default=None,
        help="stored feature values: float16, or int8 / int4 with a float16 scale per cell (1/2, 1/4 the bytes; "
        "lowrank: one scale per coefficient map); int2: lowrank only, 4 levels per coefficient (1/8 the bytes, "
        "so twice int4's rank at equal size); default int4, float16 for dense",
    )
    b.add_argument(
        "--views",
        choices=["both", "noflip"],
        default="both",
        help="views stored per image: both flips, or unflipped only",
    )
    b.add_argument(
        "--mirror-flips",
        action="store_true",
        help="store unflipped views only and serve flips by mirroring cells (approximate, smaller)",
    )
    b.add_argument(
        "--importance",
        action="store_true",
        help="also store GKD gradient-importance maps (needs a whole-map policy, lowrank or dense, channel group 1)",
    )
    b.add_argument(
        "--importance-mode",
        choices=["signed", "abs"],
        default="signed",
        help="Grad-CAM form of the stored maps: signed (paper) or abs (released GKD code)",
    )
    b.add_argument(
        "--teacher-ap", type=float, default=None, help="record this teacher AP, a fraction (default: the checkpoint's)"
    )
    b.add_argument(
        "--check-teacher",
        action="store_true",
        help="when the checkpoint records no AP, measure it on --val-split first (one evaluation pass)",
    )
    b.add_argument("--val-split", default="val", help="split --check-teacher evaluates on")
    b.add_argument(
        "--shard",
        type=int,
        default=None,
        help="build shard i of --num-shards, one process each (default: one unsharded build)",
    )
    b.add_argument("--num-shards", type=int, default=None, help="number of shards (default: one unsharded build)")
    b.add_argument("--batch-size", type=int, default=8, help="images per teacher batch")
    b.add_argument("--workers", type=int, default=2, help="data loader worker processes (0 = in process)")
    b.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    b.add_argument("--out", required=True, help="store directory (re-running the command resumes a build)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    pl = ssub.add_parser(
        "plan", help="before a build: per byte budget, the lowrank layout and how much of the teacher it keeps"
    )
    pl.add_argument("--teacher", required=True, help="teacher checkpoint")
    pl.add_argument("--data", required=True, help="data set directory or annotation file")
    pl.add_argument("--format", default=None, help=FORMAT_HELP)
    pl.add_argument("--split", default="train", help="split the teacher runs over")
    pl.add_argument(
        "--size", type=int, nargs="+", default=None, help="training scale(s), as for build (default: the teacher's)"
    )
    pl.add_argument(
        "--budget-kb",
        type=float,
        nargs="+",
        default=[16, 32, 64, 128, 256],
        help="budgets to plan, KB per image-view at COCO scale (default: 16 32 64 128 256)",
    )
    pl.add_argument("--fit-views", type=int, default=256, help="image views the spectra are measured on (as build)")
    pl.add_argument("--levels", nargs="+", default=None, help=LEVELS_HELP)
    pl.add_argument("--batch-size", type=int, default=8, help="images per teacher batch")
    pl.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    pl.set_defaults(func=run_plan)

    m = ssub.add_parser("merge", help="merge the shards of a split build into one record file")
    m.add_argument("store", help="store directory")
    m.set_defaults(func=run_merge)

    i = ssub.add_parser("info", help="what a store holds: size per image-view against dense maps, views, teacher")
    i.add_argument("store", help="store directory")
    i.set_defaults(func=run_info)

    v = ssub.add_parser("verify", help="re-read every record and check its checksum and the manifest counts")
    v.add_argument("store", help="store directory")
    v.add_argument("--allow-gaps", action="store_true", help="accept image views the build skipped (unreadable images)")
    v.set_defaults(func=run_verify)


def teacher_sizes(checkpoint: str) -> list[int]:
    """The data.sizes of the recipe the teacher was trained with (its training views), else the default."""
    from detkd.data.defaults import INPUT_SIZE
    from detkd.models.checkpoint import read_checkpoint, training_sizes

    sizes = training_sizes(read_checkpoint(checkpoint))
    if sizes:
        print(f"views at the teacher's training size(s) {sizes} (--size to choose others)")
        return sizes
    print(f"{checkpoint} records no training size: views at {INPUT_SIZE} px (--size to choose)")
    return [INPUT_SIZE]


def run_build(args: argparse.Namespace) -> int:
    from detkd.data.formats.detect import open_source
    from detkd.data.views import ViewPolicy
    from detkd.errors import ConfigError
    from detkd.runs.setup import resolve_device
    from detkd.store.build import build_store
    from detkd.store.select import SelectionPolicy

    if (args.shard is None) != (args.num_shards is None):
        raise ConfigError("--shard and --num-shards go together")
    if args.budget_kb is not None and (args.level_rank or args.rank is not None):
        raise ConfigError("--budget-kb chooses the ranks itself; drop --rank / --level-rank, or the budget")
    top_k = None
    if args.top_k is not None:
        top_k = _level_map("--top-k", args.top_k, int) if "=" in args.top_k else _number("--top-k", args.top_k, int)
    policy = SelectionPolicy(
        name=args.policy,
        per_level=_level_map("--per-level", args.per_level, str),
        kernel=args.kernel,
        threshold=args.threshold,
        top_k=top_k,
        density=args.density,
        channel_group=args.channel_group,
        value_dtype=args.value_dtype,
        rank=16 if args.rank is None else args.rank,
        fit_views=args.fit_views,
        pool=_level_map("--pool", args.pool, int),
        level_rank=_level_map("--level-rank", args.level_rank, int),
        budget_kb=args.budget_kb,
        levels=args.levels,
    )
    source = open_source(args.data, format=args.format, split=args.split)
    sizes = args.size or teacher_sizes(args.teacher)
    views = ViewPolicy(sizes=tuple(sizes), flip_prob=0.5 if args.views == "both" else 0.0)
    val = None
    if args.check_teacher and args.teacher_ap is None:
        val = open_source(args.data, format=args.format, split=args.val_split)
    manifest = build_store(
        teacher_checkpoint=args.teacher,
        source=source,
        policy=policy,
        views=views.all_views(),
        canvas=views.canvas,
        out_dir=args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        shard=args.shard,
        num_shards=args.num_shards,
        with_importance=args.importance,
        importance_mode={"channel_mode": args.importance_mode, "activation_mode": args.importance_mode},
        mirror_flips=args.mirror_flips,
        teacher_ap=args.teacher_ap,
        check_teacher_on=val,
        progress=not args.no_progress,
        device=resolve_device(args.device),
    )
    if args.shard is not None:
        print(
            f"store {args.out} shard {args.shard}/{args.num_shards}: {manifest.counts['records']} records of "
            f"{manifest.counts['images']} images; run `detkd store merge {args.out}` once every shard is built"
        )
        return 0
    return run_info(argparse.Namespace(store=args.out))


def run_plan(args: argparse.Namespace) -> int:
    from detkd.data.formats.detect import open_source
    from detkd.data.views import ViewPolicy
    from detkd.runs.setup import resolve_device
    from detkd.store.plan import plan_budgets, plan_table

    source = open_source(args.data, format=args.format, split=args.split)
    views = ViewPolicy(sizes=tuple(args.size or teacher_sizes(args.teacher)), flip_prob=0.5)
    plans = plan_budgets(
        teacher_checkpoint=args.teacher,
        source=source,
        views=views.all_views(),
        canvas=views.canvas,
        budgets_kb=args.budget_kb,
        fit_views=args.fit_views,
        levels=args.levels,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
    )
    fitted = min(args.fit_views, len(source) * len(views.all_views()))
    print(f"teacher {args.teacher}: spectra of {fitted} image-views")
    print("\n".join(plan_table(plans)))
    print("build one with: detkd store build ... --policy lowrank --budget-kb N")
    return 0


def _number(flag: str, text: str, kind: type):
    from detkd.errors import ConfigError

    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a {kind.__name__}") from None


def _level_map(flag: str, text: str, kind: type) -> dict:
    """ "p6=dense,p7=dense" -> {"p6": "dense", "p7": "dense"} (values converted by ``kind``)."""
    from detkd.errors import ConfigError

    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        level, sep, value = item.partition("=")
        if not sep or not level.strip() or not value.strip():
            raise ConfigError(f"{flag}: {item!r} is not LEVEL=VALUE (e.g. {flag} p6=dense,p7=dense)")
        out[level.strip()] = _number(flag, value.strip(), kind)
    return out


def run_merge(args: argparse.Namespace) -> int:
    from detkd.store.writer import merge_shards

    manifest = merge_shards(args.store)
    print(f"merged {args.store}: {manifest.counts['records']} records")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from detkd.store.verify import store_info

    info = store_info(args.store)
    build = info["extra"]
    state = "DAMAGED" if info["damaged"] else "complete" if info["complete"] else "INCOMPLETE"
    gaps = f", {len(info['gaps'])} skipped image-view(s)" if info["gaps"] else ""
    print(f"store {info['path']} (format v{info['format_version']}, {state}{gaps})")
    if info["damaged"]:
        print(f"  DAMAGED: {info['damaged']}")
    print(
        f"  teacher sha256 {info['teacher_hash'][:16]}...  {info['architecture'].get('family')}/"
        f"{info['architecture'].get('backbone')} FPN-{info['architecture'].get('fpn_channels')}"
        + (f", AP (x100) {100 * build['teacher_ap']:.1f}" if build.get("teacher_ap") is not None else "")
        + (" (WEAK TEACHER: distilling from it will not help)" if _weak(build.get("teacher_ap")) else "")
    )
    print(
        f"  policy {info['policy'].get('name')}  channel_group {info['policy'].get('channel_group')}  "
        f"values {info['policy'].get('value_dtype', 'float16')}  "
        f"per-level {info['policy'].get('per_level') or {}}"
        + (f"  only levels {info['policy']['levels']}" if info["policy"].get("levels") else "")
        + (
            f"  encoding {info['encoding']['name']} v{info['encoding']['version']} rank {info['encoding']['rank']} "
            f"(bases fitted on {info['encoding']['fit_views']} views, sha256 {info['encoding']['sha256'][:12]}...)"
            + (f"  level ranks {info['policy']['level_rank']}" if info["policy"].get("level_rank") else "")
            + (f"  pooled {info['policy']['pool']}" if info["policy"].get("pool") else "")
            + (f"  chosen for {info['policy']['budget_kb']:g} KB" if info["policy"].get("budget_kb") else "")
            if info["encoding"]
            else ""
        )
    )
    if info.get("kept_variance"):  # what methods comparing stored maps see of the teacher
        kept = ", ".join(f"{lv} {100 * v:.0f} %" for lv, v in info["kept_variance"].items())
        print(f"  variance kept by the basis (fit sample): {kept}")
    elif info["encoding"] and info["encoding"].get("name") == "lowrank":
        print(
            "  variance kept by the basis: not recorded (built by an older detkd), so `auto` weights from this "
            "store are calibrated on the projected loss, not variance-restored; rebuild the store to record it"
        )
    print(f"  views {', '.join(info['views'])}")
    print(
        "  levels "
        + ", ".join(
            f"{lv} (stride {d['stride']}, {d['channels']} ch, {d['feature_shape'][0]}x{d['feature_shape'][1]})"
            for lv, d in info["levels"].items()
        )
    )
    print(
        f"  {info['images']} images, {info['records']} image-views, {info['record_bytes']} record bytes, "
        f"{info['disk_bytes']} bytes on disk"
    )
    print(
        f"  bytes per image-view: {info['bytes_per_image_view']:.0f} stored vs {info['dense_fp16_bytes_per_view']} "
        f"dense fp16 maps of the stored levels = {100 * info['ratio_to_dense']:.2f} %"
    )
    coco = info["projected_coco"]
    print(
        f"  projected at COCO scale ({coco['image_hw'][1]}x{coco['image_hw'][0]} images, these levels and "
        f"channels): {coco['bytes_per_view'] / 1024:.1f} KB per image-view vs "
        f"{coco['dense_fp16_bytes_per_view'] / 2**20:.1f} MB dense fp16 = {100 * coco['ratio_to_dense']:.2f} %"
    )
    pre = info["preprocessing"]
    print(
        f"  canvas {pre.get('canvas')}px, mirror flips {'on' if pre.get('mirror_flips') else 'off'}, "
        f"importance maps {'on' if pre.get('importance') else 'off'}"
    )
    if build.get("image_views_per_second"):
        print(
            f"  build: {build['built']} image-views in {build['seconds']:.1f} s = "
            f"{build['image_views_per_second']:.1f}/s"
            + (f" by {build['shards']} shards" if "shards" in build else f" over {build.get('runs', 1)} run(s)")
        )
    if info["gaps"]:
        from detkd.store.verify import gap_lines

        print(f"  gaps: {len(info['gaps'])} image-view(s) skipped by the build (rerun it to retry them):")
        for line in gap_lines(info["gaps"]):
            print(f"    {line}")
    # A damaged store is not usable: say so in the exit status too (verify's failure code).
    return 1 if info["damaged"] else 0


def _weak(ap: float | None) -> bool:
    from detkd.engine.teacher_ap import WEAK_TEACHER_AP

    return ap is not None and not ap >= WEAK_TEACHER_AP


def run_verify(args: argparse.Namespace) -> int:
    from detkd.store.verify import verify_store

    report = verify_store(args.store, allow_gaps=args.allow_gaps)
    print(report.summary())
    return 0 if report.ok else 1
