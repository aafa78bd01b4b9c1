"""Entry point of the ``stratacache`` command: argument parsing and error reporting.

Every failure a user can cause (a bad argument, a missing file, an invalid
config) ends as one line on stderr and a non-zero exit status; ``--debug``
adds the traceback. Anything unexpected is reported the same way, so a user
never has to read a Python traceback to learn what went wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from stratacache import __version__
from stratacache.cli import bench, config_cmd, demo, inspect_cmd, mooncake_cmd, proxy, serve
from stratacache.cli.errors import CliError

PROG = "stratacache"
COMMANDS = (serve, proxy, mooncake_cmd, demo, bench, inspect_cmd, config_cmd)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a CliError (one line) instead of usage text + exit."""

    def error(self, message: str):
        raise CliError(f"{message} (see '{self.prog} --help')", status=2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="StrataCache: a tiered KV-cache and artifact store for LLM inference.",
        epilog="Run 'stratacache COMMAND --help' for a command's options. "
               "'--debug' (before the command) shows tracebacks on errors.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=OneLineParser)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def _one_line(message: str) -> str:
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit status for an exception that ended a command."""
    if isinstance(exc, CliError):
        return str(exc), exc.status
    try:
        from stratacache.config import ConfigError
    except ImportError:  # pragma: no cover - the config package is part of the install
        ConfigError = ()
    if ConfigError and isinstance(exc, ConfigError):
        return f"invalid config: {exc}", 1
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}", 1
    return (f"internal error: {type(exc).__name__}: {exc} "
            f"(rerun with 'stratacache --debug ...' for the traceback)"), 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    # Library warnings (e.g. a tier retrying an unreachable server) would bury the one-line
    # error; --debug shows them.
    logging.basicConfig(level=logging.INFO if debug else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. '| head'); exit quietly without a second error on flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - every error becomes one line for the user
        if debug:
            traceback.print_exc()
        message, status = _describe(exc)
        print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
