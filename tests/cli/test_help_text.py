"""What the help and the shipped specs name exists: every ``--flag`` a command's help text mentions is
an option of that command (``observe --calib`` once pointed to ``--data``, whose name is ``--data-dir``),
and every moe_slim file a sweep spec or mix names is in the tree."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from moe_slim.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"{prefix}{name}"] = sub
                out.update(_commands(sub, f"{prefix}{name} "))
    return out


def test_flags_named_in_help_are_options_of_that_command() -> None:
    """A flag is this command's unless the help names another command before it (``eval --plan``)."""
    commands = _commands(build_parser())
    names = {c.split()[-1] for c in commands}
    wrong = []
    for name, parser in commands.items():
        listed = {o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS}
        for action in parser._actions:
            for before, flag in re.findall(r"([\w/-]*)\s?(?<![\w-])(--[a-z][a-z0-9-]*)", action.help or ""):
                if flag not in listed and not set(before.split("/")) & names:
                    wrong.append(f"{name} {'/'.join(action.option_strings) or action.dest}: {flag}")
    assert not wrong, wrong


def test_files_named_in_shipped_specs_exist() -> None:
    named = []
    for spec in [*ROOT.glob("sweeps/*.yaml"), *ROOT.glob("calibration/**/*.yaml")]:
        for path in re.findall(r"(?:src/)?moe_slim/[\w/]+\.py", spec.read_text()):
            named.append((spec.name, path))
            assert (ROOT / "src" / path.removeprefix("src/")).is_file(), (spec.name, path)
    assert named, "the demo sweep names its schema's file"
