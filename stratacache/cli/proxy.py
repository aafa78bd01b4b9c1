"""``stratacache proxy --prefill URL... --decode URL...``: the disaggregated prefill/decode router.

An OpenAI-compatible server (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``) that sends each request to a prefill instance,
then to a decode instance with the KV the prefill stored; see
docs/disaggregation.md. It binds 127.0.0.1 unless ``--host`` is given.
"""

from __future__ import annotations

import argparse
import logging

from stratacache.cli.errors import CliError
from stratacache.disagg import (DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_HOST, DEFAULT_PORT,
                                DEFAULT_READ_TIMEOUT_S)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 seconds, not {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("proxy", help="route OpenAI requests to prefill, then decode vLLM instances",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                   help="prefill instances (kv_role kv_producer), e.g. http://127.0.0.1:8001; round-robin")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL",
                   help="decode instances (kv_role kv_consumer), e.g. http://127.0.0.1:8002; round-robin")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this host only)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--connect-timeout", type=_seconds, default=DEFAULT_CONNECT_TIMEOUT_S,
                   metavar="S", help="seconds to open a connection to a backend before answering 502 "
                                     f"(default {DEFAULT_CONNECT_TIMEOUT_S:g})")
    p.add_argument("--read-timeout", type=_seconds, default=DEFAULT_READ_TIMEOUT_S,
                   metavar="S", help="longest silence of a backend that has a request before answering "
                                     f"502; must exceed the longest prefill (default "
                                     f"{DEFAULT_READ_TIMEOUT_S:g})")
    p.set_defaults(run=run)


def run(args) -> int:
    from aiohttp import web

    from stratacache.disagg.proxy import build_app

    try:
        app = build_app(args.prefill, args.decode, connect_timeout_s=args.connect_timeout,
                        read_timeout_s=args.read_timeout)
    except ValueError as exc:
        raise CliError(str(exc), status=2) from None
    # The command's default log level is ERROR; a router's warnings (a 502, a prefill
    # without kv_transfer_params) are what its operator needs to see.
    logging.getLogger("stratacache.disagg").setLevel(logging.INFO)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host

    def started(_message: str) -> None:
        print(f"stratacache proxy: listening on http://{shown_host}:{args.port}; "
              f"prefill {' '.join(args.prefill)}; decode {' '.join(args.decode)}", flush=True)

    try:
        web.run_app(app, host=args.host, port=args.port, print=started, access_log=None,
                    shutdown_timeout=10.0)
    except OSError as exc:
        raise CliError(f"cannot listen on {shown_host}:{args.port}: {exc.strerror or exc}") from None
    return 0
