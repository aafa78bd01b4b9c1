"""Connector configuration: vLLM's ``kv_connector_extra_config`` + a YAML file -> StrataConfig.

Three kinds of key are accepted, in the extra config (optionally prefixed with
``stratacache.``) and at the top level or under ``connector:`` of the YAML:

* ``config_path``: the YAML file (validated by the plane's schema);
* dotted or nested paths of the new schema (``tiers.cpu.capacity``,
  ``{"connector": {"load_mode": "async"}}``), applied as overrides;
* the original connector's documented keys (``LEGACY_KEYS``): each maps onto
  the new schema or, where it no longer means anything, logs one deprecation
  line naming what replaced it. None is silently dropped.

Anything else reaches ``load_config`` and fails there with the key's name.
This module does not import vLLM, so the CLI can build configs cheaply.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Mapping, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from stratacache.config import (DEFAULT_PATH, ConfigError, deep_merge, expand_dotted, load_config,
                                read_yaml_file, validation_problems)

logger = logging.getLogger("vllm.stratacache")

PREFIX = "stratacache."
CONNECTOR_NAME = "StrataCacheConnectorV1"
CONNECTOR_MODULE = "stratacache.adapters.vllm.connector_v1"
MIB = 1 << 20


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


# pydantic's lenient int and float take true as 1; the original keys never did.
_Int = Annotated[int, BeforeValidator(_not_a_bool)]
_Float = Annotated[float, BeforeValidator(_not_a_bool)]


class LegacyKeyTypes(BaseModel):
    """The types of the original connector's keys, converted leniently as it did (vLLM's extra
    config often arrives as JSON strings: ``"true"``, ``"yes"``, ``"96"``); ``telemetry.export``
    is ``telemetry_export`` here. Validated one key at a time, so an error names the key as given."""

    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    use_cxl: bool = None
    writeback: bool = None
    cpu_capacity_mb: _Int = Field(None, ge=1)
    chunk_size: _Int = None
    save_partial_chunks: bool = None
    log_stats: bool = None
    log_every: _Int = None
    log_min_interval_s: _Float = None
    debug: bool = None
    cxl_dax_device: Optional[str] = None
    cxl_reset_metadata: bool = None
    telemetry_export: bool = None
    bundle_layers: Any = None
    tensor_codec: Any = None
    tensor_header_in_payload: Any = None


# A legacy key maps its converted value to (override path, new value) pairs, or returns a
# deprecation message (str) when it has no meaning any more.
LegacyRule = Callable[[str, Any], "list[tuple[str, Any]] | str"]


def _to(path: str) -> LegacyRule:
    return lambda key, value: [(path, value)]


def _use_cxl(key: str, value: bool):
    if value:
        return [("tiers.shared.enabled", True)]
    return ("use_cxl=false is deprecated: the shared-region tier (tiers.shared) now runs on /dev/shm "
            "without CXL and stays enabled because vLLM's scheduler process finds KV through it; "
            "set tiers.shared.enabled=false to turn it off")


def _writeback(key: str, value: bool):
    return [("tiers.cpu.write_policy", "write_back" if value else "write_through")]


def _cxl_dax_device(key: str, value: Optional[str]):
    if not value:
        return []
    return [("tiers.shared.path", value), ("tiers.shared.enabled", True)]


def _deprecated(message: str) -> LegacyRule:
    return lambda key, value: f"{key} is deprecated and has no effect: {message}"


LEGACY_KEYS: dict[str, LegacyRule] = {
    "use_cxl": _use_cxl,
    "writeback": _writeback,
    "cpu_capacity_mb": lambda key, mib: [("tiers.cpu.capacity", mib * MIB)],
    "chunk_size": _to("connector.chunk_size"),
    "save_partial_chunks": _to("connector.save_partial_chunks"),
    "log_stats": _to("connector.log_stats"),
    "log_every": _to("connector.log_every"),
    "log_min_interval_s": _to("connector.log_min_interval_s"),
    "debug": _to("connector.debug"),
    "cxl_dax_device": _cxl_dax_device,
    "cxl_reset_metadata": _to("tiers.shared.reset"),
    "telemetry.export": _to("telemetry.prometheus"),
    "bundle_layers": _deprecated("a chunk is always one object holding every layer's pages"),
    "tensor_codec": _deprecated("chunks are stored as raw page bytes behind the plane's "
                                "binary header (no codec)"),
    "tensor_header_in_payload": _deprecated("dtype and shape always live in the plane's binary "
                                            "artifact header"),
}

# Keys this module consumes itself (not part of the plane's schema).
CONFIG_PATH_KEY = "config_path"


@dataclass
class ConnectorSettings:
    """What the connector needs to build its StorageEngine(s)."""

    config_path: Optional[str]
    overrides: dict = field(default_factory=dict)
    deprecations: list[str] = field(default_factory=list)

    def load(self):
        """Validate through the plane's schema; raises stratacache.config.ConfigError."""
        return load_config(self.config_path, self.overrides)


def _legacy_value(name: str, value: Any, shown_key: str) -> Any:
    """``value`` of legacy key ``name`` converted to its type; ConfigError naming ``shown_key``."""
    attr = name.replace(".", "_")
    try:
        return getattr(LegacyKeyTypes.model_validate({attr: value}), attr)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc.errors(include_url=False), shown_key,
                                              model=LegacyKeyTypes, key_path=shown_key)) from None


def _absorb(entries: Mapping, source: str, settings: ConnectorSettings) -> dict:
    """One mapping's keys sorted into the config path, legacy keys (translated) and schema
    overrides; returns the overrides as a nested dict. A key that is neither legacy nor the
    config path is passed on as a schema path, so an unknown one fails in load_config naming
    itself."""
    paths: dict = {}
    for raw_key, value in entries.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{source}{raw_key!r}: keys must be strings")
        key = raw_key[len(PREFIX):] if raw_key.startswith(PREFIX) else raw_key
        if key == CONFIG_PATH_KEY:
            settings.config_path = None if value in (None, "") else os.fspath(value)
        elif key in LEGACY_KEYS:
            shown = f"{source}{raw_key}"
            mapped = LEGACY_KEYS[key](shown, _legacy_value(key, value, shown))
            if isinstance(mapped, str):
                settings.deprecations.append(mapped)
            else:
                paths.update(mapped)
        else:
            paths[key] = value
    return expand_dotted(paths)


def _legacy_part(doc: Mapping) -> tuple[dict, dict]:
    """Split a YAML document into (legacy keys, schema document)."""
    legacy: dict = {}
    rest: dict = {}
    for key, value in doc.items():
        bare = key[len(PREFIX):] if isinstance(key, str) and key.startswith(PREFIX) else key
        if bare in LEGACY_KEYS and not isinstance(value, Mapping):  # 'writeback:' is also a section
            legacy[key] = value
        elif bare == "connector" and isinstance(value, Mapping):
            conn_legacy = {k: v for k, v in value.items()
                           if k in LEGACY_KEYS and not _is_schema_connector_key(k)}
            legacy.update(conn_legacy)
            rest["connector"] = {k: v for k, v in value.items() if k not in conn_legacy}
        elif bare == "telemetry" and isinstance(value, Mapping) and "export" in value:
            legacy["telemetry.export"] = value["export"]
            rest["telemetry"] = {k: v for k, v in value.items() if k != "export"}
        else:
            rest[key] = value
    return legacy, rest


def _is_schema_connector_key(key: str) -> bool:
    return key in ("chunk_size", "save_partial_chunks", "log_stats", "log_every",
                   "log_min_interval_s", "debug")


def settings_from_extra_config(extra: Optional[Mapping]) -> ConnectorSettings:
    """Translate vLLM's kv_connector_extra_config (and the YAML it names)."""
    extra = dict(extra or {})
    settings = ConnectorSettings(config_path=None)
    extra_overrides = _absorb(extra, "kv_connector_extra_config.", settings)

    path = settings.config_path or os.environ.get("STRATACACHE_CONFIG") or None
    settings.config_path = path
    settings.overrides = extra_overrides
    if path is not None:
        legacy, rest = _legacy_part(_read_yaml(path))
        if legacy:
            # The schema does not know the legacy keys: translate them and pass
            # the rest of the file as overrides beneath the extra config's.
            yaml_overrides = _absorb(legacy, f"{path}: ", settings)
            settings.overrides = deep_merge(deep_merge(yaml_overrides, rest), extra_overrides)
            # The file is folded in: load the packaged defaults (not $STRATACACHE_CONFIG).
            settings.config_path = str(DEFAULT_PATH)
    return settings


def _read_yaml(path: str) -> dict:
    try:
        doc = read_yaml_file(os.path.expanduser(path))
    except ConfigError as exc:
        raise ConfigError(f"stratacache.config_path: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"stratacache.config_path: {path} must hold a mapping at the top level")
    return doc


KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")


def kv_transfer_config(config_path: Optional[str] = None, kv_role: str = "kv_both",
                       **extra: Any) -> dict:
    """The dict for ``LLM(kv_transfer_config=...)`` / ``--kv-transfer-config``.

    ``kv_role``: ``kv_both`` (load and store), ``kv_producer`` (the prefill instance of a
    disaggregated pair: stores, never loads) or ``kv_consumer`` (the decode instance:
    loads, never stores).

    ``extra`` entries become ``kv_connector_extra_config`` keys (schema paths
    like ``connector.load_mode`` or legacy keys like ``chunk_size``; use
    ``**{"tiers.shared.path": ...}`` for dotted names). Load failures are set
    to recompute: StrataCache is a best-effort cache, so a chunk that vanished
    or failed its checksum is recomputed rather than failing the request.
    """
    if kv_role not in KV_ROLES:
        raise ConfigError(f"kv_role: {kv_role!r} is not one of {', '.join(KV_ROLES)}")
    extra_config: dict[str, Any] = {}
    if config_path is not None:
        extra_config[PREFIX + CONFIG_PATH_KEY] = os.fspath(config_path)
    for key, value in extra.items():
        extra_config[key if key.startswith(PREFIX) else PREFIX + key] = value
    # Validate now so a bad key fails here, naming itself, not in the engine core.
    settings_from_extra_config(extra_config).load()
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": kv_role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra_config,
    }
