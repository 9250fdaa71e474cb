"""The `nimbleml` command: `risk ...`, `rec ...`, `demo`.

Bad input raises NimbleError inside the library; here it becomes one line on stderr
and exit code 2, so scripts can tell a user error from a crash.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from nimbleml import __version__
from nimbleml.errors import NimbleError
from nimbleml.logs import configure_logging

log = logging.getLogger("nimbleml")


def build_parser() -> argparse.ArgumentParser:
    from nimbleml import demo
    from nimbleml.rec import commands as rec_commands
    from nimbleml.risk import commands as risk_commands

    parser = argparse.ArgumentParser(prog="nimbleml", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nimbleml {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    risk_commands.add_parser(sub)
    rec_commands.add_parser(sub)
    demo.add_parser(sub)
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
