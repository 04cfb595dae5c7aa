"""Start-up: help and command-line errors without torch; help text and defaults for every option."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import detkd
from detkd.cli import build_parser
from detkd.commands._help import BUILTIN_FORMATS, METHOD_DESCRIPTIONS, HelpFormatter, shows_default

REPO = Path(detkd.__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "detkd.distill", "detkd.models", "detkd.engine", "detkd.store", "numpy")


def _imported(argv: list[str]) -> tuple[int, set[str]]:
    """Exit code and every module name `python -X importtime -m detkd ARGV` imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "detkd", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    # importtime lines: "import time: <self us> | <cumulative us> | <indented module name>"
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "detkd.cli" in names, proc.stderr[-2000:]  # the output was parsed at all
    return proc.returncode, names


def _heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["distill", "--help"], ["store", "build", "--help"], ["bench", "speed", "--help"]],
    ids=" ".join,
)
def test_help_imports_no_torch(argv):
    code, names = _imported(argv)
    assert code == 0
    assert _heavy(names) == []


@pytest.mark.parametrize("argv", [["no-such-command"], ["eval"], ["train", "--no-such-option", "r.yaml"]], ids=" ".join)
def test_command_line_errors_before_torch(argv):
    code, names = _imported(argv)
    assert code == 2
    assert _heavy(names) == []


def test_static_method_list_equals_registry():
    import detkd.distill  # noqa: F401  (registers every method)
    from detkd.distill.base import describe_methods

    assert METHOD_DESCRIPTIONS == describe_methods()


def _parsers(parser: argparse.ArgumentParser, name: str = "detkd"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_and_a_default():
    missing, no_default = [], []
    for name, parser in _parsers(build_parser()):
        assert isinstance(parser.formatter_class(name), HelpFormatter), name
        parser.format_help()  # renders: a stray "%" in a help string would raise here, not in a user's terminal
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(label)
            if shows_default(action):
                text = HelpFormatter(name)._get_help_string(action) % {"default": action.default}
                if "default" not in text or "default: None" in text:
                    no_default.append(f"{label}: {text!r}")
    assert missing == [], "options without help text"
    assert no_default == [], "options whose help shows no (meaningful) default"


def test_help_shows_defaults_and_no_markup(capsys):
    for argv in (["distill", "--help"], ["eval", "--help"], ["bench", "speed", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        text = " ".join(capsys.readouterr().out.split())  # as rendered, without the line wrapping
        assert "``" not in text, argv  # reST markup printed raw
        if argv[0] != "distill":  # distill has flags only
            assert "(default:" in text, argv
        if argv[0] == "eval":
            assert "images per batch (default: 8)" in text
        if argv[0] == "distill":
            assert "fitnet FitNet hint loss" in text  # the method list in the epilog


def test_format_help_lists_the_registered_builtin_formats():
    from detkd.data.formats.base import FORMATS

    assert list(BUILTIN_FORMATS) == FORMATS.names()
