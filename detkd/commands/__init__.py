"""Subcommands: each module has ``add_parser(subparsers)`` that sets ``func``."""

from detkd.commands import bench, data, demo, distill, export, train

COMMANDS = [demo, data, train, distill, bench, export]
