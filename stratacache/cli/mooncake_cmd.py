"""``stratacache mooncake master|holder``: the long-lived processes of a Mooncake Store tier.

A Mooncake deployment is one master per cluster, one segment holder per host
and the engines (vLLM with ``tiers.mooncake``, ``global_segment_size: 0``).
The holder is Mooncake's own standalone client daemon (``mooncake_client``):
it contributes the host's memory to the store and keeps it while engines
restart, so KV outlives them. Both commands build the Mooncake command line
from StrataCache's settings (defaults on 127.0.0.1) and then become that
process (``exec``), so its PID, signals and exit status are Mooncake's own.
docs/mooncake.md shows the whole topology.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

from stratacache.cli.errors import CliError

DEFAULT_HOST = "127.0.0.1"
MASTER_PORT = 50051          # Mooncake's defaults
METRICS_PORT = 9003
HOLDER_PORT = 50052
MIN_SEGMENT_BYTES = 16 << 20   # a smaller segment aborts mooncake_client
EXPOSURE_WARNING = (
    "Mooncake's clients (this holder, every engine) open their transfer and handshake "
    "listeners on 0.0.0.0 and [::] whatever --host says; run them in a network namespace or "
    "behind a firewall that admits only the cluster (docs/mooncake.md)")


def add_parser(sub) -> None:
    p = sub.add_parser("mooncake", help="run a Mooncake Store master or per-host segment holder",
                       description=__doc__.split("\n\n")[0])
    roles = p.add_subparsers(dest="role", metavar="ROLE", required=True)
    master = roles.add_parser(
        "master", help="the cluster's mooncake_master (metadata, allocation, leases)",
        description="Start mooncake_master with its RPC and HTTP metrics servers on --host.")
    master.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address the RPC and metrics servers bind (default {DEFAULT_HOST})")
    master.add_argument("--port", type=port_number, default=MASTER_PORT,
                        help=f"RPC port: the engines' tiers.mooncake.master_address (default "
                             f"{MASTER_PORT})")
    master.add_argument("--metrics-port", type=port_number, default=METRICS_PORT,
                        help=f"HTTP metrics / key listing port: tiers.mooncake.metrics_address "
                             f"(default {METRICS_PORT})")
    master.add_argument("--client-ttl", type=positive_int, default=None, metavar="S",
                        help="seconds before a dead client's segment and objects are dropped "
                             "(Mooncake's default if not given)")
    master.add_argument("--lease-ttl-ms", type=positive_int, default=None, metavar="MS",
                        help="read lease every get grants; keep it above a batch's transfer time "
                             "(Mooncake's default 5000 if not given)")
    master.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    master.set_defaults(run=run_master)
    holder = roles.add_parser(
        "holder", help="this host's segment holder (mooncake_client): KV outlives engine restarts",
        description="Start Mooncake's standalone client daemon, contributing --segment-size bytes "
                    "of this host's memory, attached to the master tiers.mooncake names.")
    holder.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="StrataCache YAML config whose tiers.mooncake gives master_address, "
                             "metadata_server, local_hostname, protocol and device_names "
                             "(default: $STRATACACHE_CONFIG, else the packaged defaults)")
    holder.add_argument("--segment-size", type=segment_size, default=1 << 30, metavar="SIZE",
                        help="memory this host contributes to the store, e.g. 64GiB "
                             "(default 1GiB, at least 16MiB)")
    holder.add_argument("--port", type=port_number, default=HOLDER_PORT,
                        help=f"the daemon's own service port (default {HOLDER_PORT})")
    holder.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    holder.set_defaults(run=run_holder)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, got {text!r}")
    return port


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def segment_size(text: str) -> int:
    from stratacache.config.schema import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < MIN_SEGMENT_BYTES:
        raise argparse.ArgumentTypeError(f"must be at least 16MiB (Mooncake's client aborts "
                                         f"below that), got {text!r}")
    return size


def mooncake_binary(name: str) -> str:
    """The Mooncake console script installed next to this Python (the venv), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.access(here, os.X_OK) else shutil.which(name)
    if not found:
        raise CliError(f"{name} not found next to {sys.executable} or on PATH: install the pip "
                       "package mooncake-transfer-engine-non-cuda==0.3.13.post1 (and Debian's "
                       "libibverbs1)")
    return found


def master_command(*, host: str = DEFAULT_HOST, port: int = MASTER_PORT,
                   metrics_port: int = METRICS_PORT, client_ttl_s: Optional[int] = None,
                   lease_ttl_ms: Optional[int] = None) -> list[str]:
    """The argv of a ``mooncake_master`` serving RPC and metrics on ``host`` only (its HTTP
    metadata server stays off: engines use ``P2PHANDSHAKE``)."""
    cmd = [mooncake_binary("mooncake_master"), f"--rpc_address={host}", f"--rpc_port={port}",
           f"--metrics_host={host}", f"--metrics_port={metrics_port}"]
    if client_ttl_s is not None:
        cmd.append(f"--client_ttl={client_ttl_s}")
    if lease_ttl_ms is not None:
        cmd.append(f"--default_kv_lease_ttl={lease_ttl_ms}")
    return cmd


def holder_command(master_address: str, *, segment_bytes: int, port: int = HOLDER_PORT,
                   local_hostname: str = DEFAULT_HOST, metadata_server: str = "P2PHANDSHAKE",
                   protocol: str = "tcp", device_names: str = "") -> tuple[list[str], dict]:
    """(argv, environment) of a ``mooncake_client`` daemon holding ``segment_bytes`` of this
    host's memory in the store. ``MC_TCP_BIND_ADDRESS`` is ``local_hostname`` unless the
    environment sets it (a host with only loopback has no other address to pick)."""
    cmd = [mooncake_binary("mooncake_client"), f"--host={local_hostname}", f"--port={port}",
           f"--master_server_address={master_address}", f"--metadata_server={metadata_server}",
           f"--global_segment_size={segment_bytes}", f"--protocol={protocol}"]
    if device_names:
        cmd.append(f"--device_names={device_names}")
    env = dict(os.environ)
    env.setdefault("MC_TCP_BIND_ADDRESS", local_hostname)
    return cmd, env


def run_master(args) -> int:
    if args.metrics_port == args.port:
        raise CliError(f"--metrics-port must differ from --port (both {args.port})", status=2)
    cmd = master_command(host=args.host, port=args.port, metrics_port=args.metrics_port,
                         client_ttl_s=args.client_ttl, lease_ttl_ms=args.lease_ttl_ms)
    if not _is_loopback(args.host):
        _warn(f"the master's RPC and metrics servers bind {args.host}: reachable from that "
              "network; the metrics server also lists every key")
    return _become(cmd, dict(os.environ), args.dry_run)


def run_holder(args) -> int:
    from stratacache.cli.config_cmd import load_checked

    section = load_checked(args.config)[0].tiers.mooncake
    cmd, env = holder_command(section.master_address, segment_bytes=args.segment_size,
                              port=args.port, local_hostname=section.local_hostname,
                              metadata_server=section.metadata_server, protocol=section.protocol,
                              device_names=section.device_names)
    _warn(EXPOSURE_WARNING)
    return _become(cmd, env, args.dry_run)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _warn(message: str) -> None:
    print(f"stratacache mooncake: warning: {message}", file=sys.stderr)


def _become(cmd: list[str], env: dict, dry_run: bool) -> int:
    """Print ``cmd`` (dry run) or replace this process with it."""
    if dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # pragma: no cover - execve does not return
