"""The ``detkd`` command: one entry point, one module per subcommand under detkd/commands/."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from detkd import __version__
from detkd.commands import COMMANDS
from detkd.commands._help import Parser
from detkd.errors import DetkdError

# OSErrors that are the disk's or the file system's doing: reported in one line, exit code 2.
REPORTED_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS})


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
    except OSError as exc:
        message = os_error_message(exc)
        if message is None:
            raise
        print(f"detkd: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detkd: interrupted", file=sys.stderr)
        return 130


def os_error_message(exc: OSError) -> str | None:
    """``<filename>: no space left on device`` for a disk-full / permission / read-only error, else None.

    Any module may let such an OSError reach ``main`` (set ``filename`` to the path the user knows).
    """
    if exc.errno not in REPORTED_ERRNOS:
        return None
    reason = os.strerror(exc.errno).lower()
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


if __name__ == "__main__":
    raise SystemExit(main())
