"""``stratacache config check FILE`` and ``stratacache config show``.

``check`` reads a file exactly as the vLLM connector will (the plane's schema
plus the original connector's legacy keys, which are translated or reported
as deprecated), so a config that passes here is one the fleet will accept;
it prints the effective merged config. ``show`` lists every key with its
type, default and meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

from stratacache.cli.errors import CliError
from stratacache.cli.report import format_table


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="validate a config file or list every config key",
                       description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate FILE and print the effective merged config")
    check.add_argument("file", metavar="FILE", type=Path, help="a StrataCache YAML config")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(run=run_check)
    show = actions.add_parser("show", help="print every key with its type, default and meaning")
    show.add_argument("--json", action="store_true", help="print the keys as a JSON list")
    show.set_defaults(run=run_show)


def load_checked(path: Path | None):
    """(validated StrataConfig, deprecation notes) read as the connector reads it.

    ``path`` None means $STRATACACHE_CONFIG, else the packaged defaults.
    """
    from stratacache.adapters.vllm.settings import settings_from_extra_config

    if path is not None and not path.exists():
        raise CliError(f"config file not found: {path}")
    if path is not None and path.is_dir():
        raise CliError(f"config file is a directory: {path}")
    settings = settings_from_extra_config({} if path is None else {"config_path": str(path)})
    return settings.load(), list(settings.deprecations)


def run_check(args) -> int:
    import yaml

    cfg, notes = load_checked(args.file)
    effective = cfg.to_dict()
    if args.json:
        print(json.dumps({"file": str(args.file), "valid": True, "deprecations": notes,
                          "config": effective}, indent=2))
        return 0
    for note in notes:
        print(f"# note: {note}")
    print(f"# {args.file}: valid. Effective config (packaged defaults < this file):")
    print(yaml.safe_dump(effective, sort_keys=False).rstrip())
    return 0


def run_show(args) -> int:
    from stratacache.config import describe_config

    rows = describe_config()
    if args.json:
        print(json.dumps([{"key": k, "type": t, "default": d, "doc": doc} for k, t, d, doc in rows],
                         indent=2))
        return 0
    print(format_table(["key", "type", "default", "meaning"],
                       [[k, t, json.dumps(d) if not isinstance(d, str) else d, doc]
                        for k, t, d, doc in rows]))
    print("\nSizes take units (512MiB, 4GiB). Precedence, lowest first: these defaults < a YAML "
          "file (--config / $STRATACACHE_CONFIG) < kv_connector_extra_config.")
    return 0
