"""Subcommands: each module has ``add_parser(subparsers)`` that sets ``func``."""

from detkd.commands import data, distill, train

COMMANDS = [data, train, distill]
