"""The `nimbleml` command: `risk ...`, `rec ...`, `demo`.

Bad input raises NimbleError inside the library; here it becomes one line on stderr
and exit code 2, so scripts can tell a user error from a crash.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from nimbleml import __version__
from nimbleml.errors import NimbleError
from nimbleml.logs import configure_logging

log = logging.getLogger("nimbleml")


# Every module here has `add_parser(subparsers)`; adding a command is one line.
# Workload commands live beside their workload (`risk`, `rec`); commands that tie the
# domain-agnostic core (compress, runtime, serve, bench) to a workload live in `nimbleml.commands`.
COMMAND_MODULES = (
    "nimbleml.risk.commands",
    "nimbleml.rec.commands",
    "nimbleml.demo",
    "nimbleml.commands.bench",
    "nimbleml.commands.serve",
    "nimbleml.commands.loadtest",
    "nimbleml.commands.export",
    "nimbleml.commands.compress",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimbleml", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nimbleml {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: nimbleml's debug lines and hidden library notices; -vv: every library's debug lines too")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except NimbleError as err:
        print(f"nimbleml: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nimbleml: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
