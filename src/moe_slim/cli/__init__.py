"""The ``moe-slim`` command: parses, calls the Python API, prints. No logic of its own.

Each area of the toolkit registers its subcommands from its own module in this package, so the areas
can grow without touching each other. A :class:`~moe_slim.errors.MoeSlimError` becomes one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import MoeSlimError

COMMAND_MODULES: tuple[str, ...] = (
    "moe_slim.cli.core",
    "moe_slim.cli.data",
    "moe_slim.cli.eval",
    "moe_slim.cli.dense",
    "moe_slim.cli.merge",
    "moe_slim.cli.mone",
    "moe_slim.cli.reference",
    "moe_slim.cli.sweep",
    "moe_slim.cli.sft",
    "moe_slim.cli.recipe",
    "moe_slim.cli.push",
)


class Parser(argparse.ArgumentParser):
    """argparse with moe_slim's error convention: one line naming the problem, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"moe-slim: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every area's subcommands."""
    from .. import __version__

    parser = Parser(prog="moe-slim", description="Make MoE language models smaller.")
    parser.add_argument("--version", action="version", version=f"moe-slim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an area not built yet
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _quiet_libraries() -> None:
    """Library progress bars and warnings would bury the one line a user needs to read."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests): nothing to flush into a pipe
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "--quiet" in (sys.argv[1:] if argv is None else argv):
        # tqdm reads TQDM_DISABLE when it is imported (lm-eval's, datasets' and transformers' bars use it),
        # so this must happen before any library loads
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    _quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already said in one line
        return exc.code if isinstance(exc.code, int) else 0
    try:
        result = args.func(args)
    except MoeSlimError as exc:
        print(f"moe-slim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-slim: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moe-slim ... | head`: the reader has what it wanted; say nothing
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left
    except OSError as exc:  # a file that cannot be read or written, said in one line
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"moe-slim: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
