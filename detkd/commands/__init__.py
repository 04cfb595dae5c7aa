"""Subcommands: each module has ``add_parser(subparsers)`` that sets ``func``."""

from detkd.commands import bench, data, demo, distill, export, store, train

COMMANDS = [demo, data, train, distill, store, bench, export]
