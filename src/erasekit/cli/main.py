"""The single ``erasekit`` entry point.

Each subcommand lives in its own module of this package exposing ``register(subparsers)``, which adds a
parser and sets ``func(args) -> int``. User errors (:class:`~erasekit.errors.ErasekitError`) print one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from erasekit import __version__
from erasekit.errors import ErasekitError

# Subcommand modules, in the order `erasekit --help` lists them.
COMMAND_MODULES = (
    "erasekit.cli.env",
    "erasekit.cli.models",
    "erasekit.cli.erase",
    "erasekit.cli.patching",
    "erasekit.cli.generate",
    "erasekit.cli.demo",
    "erasekit.cli.minicanvas",
    "erasekit.cli.evaluate",
    "erasekit.cli.attack",
    "erasekit.cli.bench",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other user error
        self.exit(2, f"erasekit: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="erasekit", description="Erase concepts from text-to-image diffusion models.")
    parser.add_argument("--version", action="version", version=f"erasekit {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors and --help: a return code, so main() is callable from Python
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from erasekit import progress

    progress.set_enabled(not args.quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            return int(args.func(args) or 0)
    except ErasekitError as e:
        print(f"erasekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erasekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
