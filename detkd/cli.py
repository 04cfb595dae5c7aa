"""The ``detkd`` command: one entry point, one module per subcommand under detkd/commands/."""

from __future__ import annotations

import argparse
import logging
import sys

from detkd import __version__
from detkd.commands import COMMANDS
from detkd.commands._help import Parser
from detkd.errors import DetkdError


def build_parser() -> argparse.ArgumentParser:
    # Parser passes its help formatter on to every subcommand. Nothing imported while building the
    # parser may pull in torch: --help and command-line errors must come back in a fraction of a second.
    parser = Parser(prog="detkd", description="Knowledge distillation for object detectors.")
    parser.add_argument("--version", action="version", version=f"detkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except DetkdError as exc:
        print(f"detkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
