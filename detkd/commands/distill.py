"""detkd distill RECIPE method=NAME teacher=PATH [key=value ...]"""

from __future__ import annotations

import argparse

from detkd.commands._help import METHOD_DESCRIPTIONS

DESCRIPTION = (
    "Train a student recipe with distillation from a teacher checkpoint (online: the teacher runs every step)\n"
    "or from a knowledge store built by `detkd store build` (stored: no teacher forward pass)."
)


def _epilog() -> str:
    # The static list, not the registry: importing the methods would import torch just to print help.
    lines = ["methods:"]
    lines += [f"  {name:<12} {desc}" for name, desc in METHOD_DESCRIPTIONS]
    lines += [
        "",
        "shorthands: method=NAME[:WEIGHT][+NAME[:WEIGHT]...]  teacher=CHECKPOINT_OR_STORE_DIR  inherit=true",
        "            WEIGHT: auto (default: gradient-balanced against the detection loss), paper (the published",
        "            weight), or a number (a fixed multiplier of the published weight)",
        "            args.NAME.KEY=VALUE sets a method keyword argument (e.g. args.ssim.window_size=7)",
        "examples:",
        "  detkd distill configs/shapes_student.yaml method=fitnet teacher=runs/teacher/best.pt",
        "  detkd distill configs/shapes_student.yaml method=fitnet teacher=stores/teacher   # no teacher forward",
    ]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="train a student with a teacher checkpoint (online) or a knowledge store (stored)",
        epilog=_epilog(),
        description=DESCRIPTION,
    )
    p.add_argument("recipe", help="student recipe YAML")
    p.add_argument("overrides", nargs="*", help="method=..., teacher=..., or dotted key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_distill)


def expand_shorthands(items: list[str]) -> list[str]:
    """Turn method=/teacher=/inherit=/args.M.K= into recipe overrides."""
    from detkd.config import ConfigError, parse_value

    out, methods, args = [], [], {}
    for item in items:
        key, _, value = item.partition("=")
        if key == "method":
            for part in value.split("+"):
                name, _, weight = part.partition(":")
                if not name.strip():
                    raise ConfigError(f"{item!r}: a method name is missing (method=NAME[:WEIGHT][+NAME[:WEIGHT]...])")
                entry: dict = {"name": name.strip()}
                if weight.strip():  # omitted: the recipe's default rule
                    entry["weight"] = method_weight(weight, item=item)
                methods.append(entry)
        elif key in ("teacher", "inherit", "levels"):
            out.append(f"distill.{key}={value}")
        elif key.startswith("args."):
            parts = key.split(".")
            if len(parts) != 3 or not all(parts):
                raise ConfigError(f"{item!r}: method arguments are args.METHOD.KEY=VALUE")
            args.setdefault(parts[1], []).append((parts[2], value))
        else:
            out.append(item)
    if methods:
        import yaml

        for m in methods:
            m["args"] = {k: parse_value(v, what=f"args.{m['name']}.{k}={v}") for k, v in args.pop(m["name"], [])}
        if args:
            raise ConfigError(f"arguments given for methods not selected: {sorted(args)}")
        out.append("distill.methods=" + yaml.safe_dump(methods, default_flow_style=True).strip())
    elif args:
        raise ConfigError("args.METHOD.KEY=VALUE needs method=METHOD on the same command line")
    return out


def method_weight(text: str, *, item: str) -> float | str:
    """The WEIGHT of ``method=NAME:WEIGHT``: ``auto``, ``paper`` or a finite number >= 0."""
    from detkd.config import ConfigError, method_weight_value

    text = text.strip()
    try:
        return method_weight_value(text if text in ("auto", "paper") else float(text))
    except ValueError:
        raise ConfigError(f"{item!r}: method weight {text!r} is not 'auto', 'paper' or a finite number >= 0") from None


def run_distill(args: argparse.Namespace) -> int:
    from detkd.commands.train import print_summary
    from detkd.config import load_recipe
    from detkd.runs import distill

    recipe = load_recipe(args.recipe, expand_shorthands(args.overrides))
    metrics = distill(recipe, resume=args.resume, progress=not args.no_progress)
    print_summary(metrics, recipe.train.out)
    if metrics:
        print(f"stored teacher: {metrics.get('stored')}  inheriting init: {metrics.get('inherit')}")
    return 0
