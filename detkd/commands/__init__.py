"""Subcommands: each module has ``add_parser(subparsers)`` that sets ``func``."""

from detkd.commands import data, distill, export, train

COMMANDS = [data, train, distill, export]
