"""The config schema: typed pydantic models of every key of config.yaml, its type, range and meaning.

The models are the single description of what a valid config is: each key is a
field whose annotation is its type and range and whose description is its
documentation (the README and docs/config.md tables are generated from them).
Every section forbids unknown keys; rules between keys, and checks against this
host, are model validators. Defaults live in the packaged ``default.yaml`` (the
repo's config.yaml); the models check that file like any other, so the two
cannot drift apart silently. ``stratacache.config`` turns pydantic's errors
into ``ConfigError`` messages that start with the dotted key path.
"""

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, ClassVar, Iterator, Literal, Optional
from urllib.parse import parse_qs, urlsplit

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      PrivateAttr, create_model, model_validator)

from stratacache.core.errors import ConfigError

__all__ = ["ConfigError", "KeyProblem", "Section", "StrataConfig", "TypeName", "parse_size",
           "parse_file_mode", "expand_path", "redis_url_problem", "MAX_SIZE"]


# ----------------------------------------------------------------- value kinds

_SIZE_RE = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
MAX_SIZE = 2**63 - 1   # sizes are int64 byte counts everywhere below
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_size(value: Any) -> int:
    """``4GiB`` / ``1.5GB`` / ``512`` -> bytes. Raises ValueError with the reason.

    A fraction with a unit is rounded to the nearest byte (``1.5KiB`` is 1536); a
    fraction of a byte (``'1.5'``, ``1.5``, ``'2.5B'``) is refused, never truncated."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 4GiB or a number of bytes, got a bool")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"a size in bytes must be a whole number, got {value!r}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"expected a size like 4GiB, 512MiB, 1.5GB or 1024, got {value!r}")
        unit = _SIZE_UNITS[m.group(2).lower()]
        exact = Fraction(m.group(1)) * unit
        if unit == 1 and exact.denominator != 1:
            raise ValueError(f"a size in bytes must be a whole number, got {value!r} "
                             "(add a unit, e.g. 1.5KiB)")
        n = round(exact)
    else:
        raise ValueError(f"expected a size like 4GiB or a number of bytes, got {type(value).__name__} {value!r}")
    if n < 0:
        raise ValueError(f"a size must not be negative, got {value!r}")
    if n > MAX_SIZE:
        raise ValueError(f"{value!r} is above the largest size, 2^63-1 bytes")
    return n


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, str) else str(v)


def parse_file_mode(value: Any) -> int:
    """``"0600"`` -> 0o600. Raises ValueError unless the owner reads and writes and others get nothing."""
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f"expected an octal permission string such as \"0600\", got {_show(value)} "
                         "(quote it in YAML so it stays a string)")
    mode = int(value, 8)
    if mode & 0o007:
        raise ValueError(f"{value!r} gives access to all users; shared files must not be world-accessible")
    if mode & 0o600 != 0o600:
        raise ValueError(f"{value!r} does not let the owner read and write the file (use \"0600\" "
                         "or \"0660\")")
    return mode


_ENV_REF = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_path(value: str) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded, never taken literally; the result must be
    absolute. Raises ValueError naming an unset variable or a path that stays relative."""
    def var(m: re.Match) -> str:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{value!r}: ${{{name}}} is not an environment variable name")
        if name not in os.environ:
            raise ValueError(f"{value!r}: environment variable ${name} is not set")
        return os.environ[name]

    if "$" in value and not _ENV_REF.search(value):
        raise ValueError(f"{value!r}: a '$' that does not name an environment variable")
    out = os.path.expanduser(_ENV_REF.sub(var, value))
    if out.startswith("~"):
        raise ValueError(f"{value!r}: unknown user in {out.split('/')[0]!r}")
    if not os.path.isabs(out):
        raise ValueError(f"{value!r} is a relative path; give an absolute one (~ and $VARS "
                         "are expanded), so it does not depend on the working directory")
    return os.path.normpath(out)


@dataclass(frozen=True)
class TypeName:
    """How a value type is named in the key tables (metadata of an ``Annotated`` type)."""

    text: str


def _refuse(problem) -> AfterValidator:
    """An after-validator raising ValueError with ``problem(value)``'s text when it returns one."""
    def check(value):
        text = problem(value)
        if text:
            raise ValueError(text)
        return value
    return AfterValidator(check)


def _blank(value: str) -> Optional[str]:
    return f"got the empty string {value!r}" if not value.strip() else None


def choice(*options: Any) -> Any:
    """One of ``options``, matched by type as well as value (YAML's ``1`` is not ``true``)."""
    def exact(value: Any) -> Any:
        if value is None:
            raise ValueError("got null, which is not allowed here")
        for option in options:
            if type(option) is type(value) and option == value:
                return option
        raise ValueError(f"{_show(value)} is not one of {', '.join(_show(o) for o in options)}")
    return Annotated[Literal[options], BeforeValidator(exact)]


Text = Annotated[str, _refuse(_blank)]
Size = Annotated[int, BeforeValidator(parse_size), TypeName("size (e.g. 4GiB)")]
FileMode = Annotated[int, BeforeValidator(parse_file_mode), PlainSerializer(lambda mode: f"{mode:04o}"),
                     TypeName('octal string (e.g. "0600")')]
AbsPath = Annotated[str, _refuse(_blank), AfterValidator(expand_path),
                    TypeName("absolute path (~ and $VARS expanded)")]
Seconds = Annotated[float, Field(ge=0.0)]
Timeout = Annotated[float, Field(ge=0.001)]


def _dir_path(value: str) -> Optional[str]:
    if os.path.exists(value) and not os.path.isdir(value):
        return f"{value!r} exists and is not a directory"
    return None


def _region_path(value: str) -> Optional[str]:
    if os.path.isdir(value):
        return f"{value!r} is a directory; the shared region needs a file or DAX device path"
    parent = os.path.dirname(value)
    if not os.path.isdir(parent):
        return f"the directory {parent!r} of {value!r} does not exist"
    return None


def redis_url_problem(value: str) -> Optional[str]:
    """What is wrong with a Redis URL (each seed of a comma-separated cluster list), as
    the client would find out only when connecting: scheme, host, port, db number."""
    for url in value.split(","):
        url = url.strip()
        if not re.match(r"^(redis|rediss|unix)://", url):
            return f"{url!r} is not a redis://, rediss:// or unix:// URL"
        try:
            parts = urlsplit(url)
            port = parts.port
            host = parts.hostname
        except ValueError as exc:
            return f"{_redact(url)!r} cannot be parsed ({exc})"
        query = parse_qs(parts.query)
        if parts.scheme == "unix":
            if not parts.path:
                return f"{_redact(url)!r} names no socket path (unix:///path/to/redis.sock)"
            db = (query.get("db") or ["0"])[0]
        else:
            if not host or parts.netloc.count("@") > 1:
                return f"{_redact(url)!r} names no valid host (redis://host:port/db)"
            if port is not None and not 1 <= port <= 65535:
                return f"{_redact(url)!r}: port {port} is not in 1..65535"
            db = parts.path.lstrip("/") or (query.get("db") or ["0"])[0]
        if not db.isdigit():
            return f"{_redact(url)!r}: database {db!r} is not a number (redis://host:port/0)"
    return None


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _existing_file(value: str) -> Optional[str]:
    if not os.path.isfile(value):
        return f"file {value!r} does not exist"
    return None


def _host_allocatable() -> Optional[int]:
    """Largest private allocation this host's overcommit policy lets one process reserve
    (Linux); None where that cannot be read."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            mode = int(f.read())
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
    except (OSError, ValueError, IndexError):
        return None
    if mode == 1:
        return 1 << 47                  # always overcommit: only the address space limits
    if mode == 2:
        return info.get("CommitLimit")
    return info.get("MemTotal", 0) + info.get("SwapTotal", 0)


def _cpu_arena_problem(capacity: int) -> Optional[str]:
    from stratacache.backends.cpu import arena_bytes

    limit = _host_allocatable()
    need = arena_bytes(capacity)
    if limit is not None and need > limit:
        return (f"{capacity} bytes (an arena of {need} bytes) cannot be reserved on this host: "
                f"it allows at most {limit} bytes in one allocation (RAM + swap under the "
                "kernel's overcommit policy)")
    return None


class KeyProblem(ValueError):
    """A rule between keys, or against this host, broken: reported at ``key`` of the section
    whose validator raised it; ``{section}`` in the text stands for that section's path."""

    def __init__(self, key: str, text: str):
        super().__init__(text)
        self.key = key


def _backoff_in_order(section: "Section") -> None:
    if section.retry_backoff_max_s < section.retry_backoff_s:
        raise KeyProblem("retry_backoff_max_s", "must be >= {section}.retry_backoff_s")


# ----------------------------------------------------------------- sections

class Section(BaseModel, Mapping):
    """A validated, read-only config section: attribute access (``cfg.tiers.cpu.capacity``) and
    read-only mapping access (``cfg.tiers["cpu"]``, ``section.get("promote", True)``, iteration
    over its key names)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    key_path: ClassVar[str] = ""          # "tiers.cpu." for the cpu tier; set below

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            return super().__getattr__(name)
        raise AttributeError(f"config has no key {self.key_path}{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            return super().__setattr__(name, value)
        raise AttributeError("config sections are read-only; pass overrides to load_config")

    def __getitem__(self, name: str) -> Any:
        if name not in type(self).model_fields:
            raise KeyError(f"config has no key {self.key_path}{name}")
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(type(self).model_fields)

    def __len__(self) -> int:
        return len(type(self).model_fields)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML-serialisable; sizes as ints, file modes as octal strings)."""
        return self.model_dump()


_WritePolicy = Annotated[choice("write_through", "write_back"), Field(
    description="how stores reach the next enabled tier below: write_through stores there before "
                "acknowledging; write_back acknowledges at once and a background flusher writes the "
                "object down")]
_Promote = Annotated[bool, Field(description="copy an object found in a lower tier into this tier on a "
                                             "chain read")]
_DemoteOnEvict = Annotated[bool, Field(description="write objects evicted from this tier into the next "
                                                   "tier even under write_through")]
_Eviction = Annotated[choice("lru", "s3fifo"), Field(description="eviction policy: lru, or s3fifo "
                                                                  "(scan-resistant)")]
_AutoOrBool = choice("auto", True, False)
_FirstBackoff = Annotated[Seconds, Field(description="first back-off after a failure of the server; "
                                                    "doubles up to the max")]
_LongestBackoff = Annotated[Seconds, Field(description="longest back-off after repeated failures")]


class CpuTierConfig(Section):
    """``tiers.cpu``: the per-process arena."""

    enabled: bool = Field(description="use the per-process CPU arena tier")
    capacity: Size = Field(ge=1, description="bytes of payload the CPU arena holds (reserved lazily); with "
                           "1/16 slack, at most what one allocation may reserve on the host (RAM + swap "
                           "under the default overcommit policy)")
    eviction: _Eviction
    pin_memory: _AutoOrBool = Field(description="page-lock the arena for fast GPU copies: auto pins when "
                                    "CUDA is present")
    write_policy: _WritePolicy
    promote: _Promote
    demote_on_evict: _DemoteOnEvict

    @model_validator(mode="after")
    def _arena_fits_this_host(self) -> "CpuTierConfig":
        problem = _cpu_arena_problem(self.capacity) if self.enabled else None
        if problem:
            raise KeyProblem("capacity", problem)
        return self


class SharedTierConfig(Section):
    """``tiers.shared``: the host-wide shared region."""

    enabled: bool = Field(description="use the host-wide shared region tier (shm or CXL)")
    path: Annotated[AbsPath, _refuse(_region_path)] = Field(
        description="/dev/shm file, file on a DAX filesystem, or /dev/daxX.Y device")
    capacity: Size = Field(ge=1, description="bytes of payload the shared region holds")
    max_objects: int = Field(ge=1, le=2**30, description="index slots in the region")
    numa_node: Optional[int] = Field(ge=0, description="bind the region's memory to this NUMA node (CXL "
                                     "as a CPU-less node)")
    file_mode: FileMode = Field(description="permissions of the region file: \"0600\", or \"0660\" to "
                                "share with a group; the owner must read and write, others get nothing")
    reset: bool = Field(description="wipe the region at start-up instead of reusing its contents")
    prefault: Size = Field(ge=0, description="bytes of stored objects whose pages a vLLM worker maps in "
                           "the background when it attaches, so its first hits take no page faults; "
                           "0 disables")
    register_cuda: _AutoOrBool = Field(description="page-lock the region for one-copy GPU transfers "
                                       "(cudaHostRegister): auto when CUDA is present; vLLM's scheduler "
                                       "process always opens it unregistered")
    write_policy: _WritePolicy
    promote: _Promote
    demote_on_evict: _DemoteOnEvict


class DiskTierConfig(Section):
    """``tiers.disk``: files under a local directory."""

    enabled: bool = Field(description="use the local-disk tier")
    path: Annotated[AbsPath, _refuse(_dir_path)] = Field(
        description="directory holding the tier's files (created 0700 if missing)")
    capacity: Size = Field(ge=1, description="bytes of payload the directory may hold; never exceeded")
    eviction: _Eviction
    io_threads: int = Field(ge=1, le=256, description="threads doing file I/O")
    write_policy: _WritePolicy
    promote: _Promote
    demote_on_evict: _DemoteOnEvict


_ExistingFile = Annotated[AbsPath, _refuse(_existing_file)]


class RedisTierConfig(Section):
    """``tiers.redis``: a Redis server or cluster shared by many hosts (the last tier)."""

    enabled: bool = Field(description="use the Redis / Redis Cluster tier")
    url: Annotated[Text, _refuse(redis_url_problem)] = Field(
        description="server URL: redis://host:port/db (port 1-65535, db a number), rediss:// for TLS, or "
                    "unix:///path; a cluster takes comma-separated seeds")
    cluster: bool = Field(description="talk to a Redis Cluster (Valkey) instead of a single server")
    username: Optional[Text] = Field(description="ACL user name")
    password: Optional[Text] = Field(description="password (prefer the URL or an ACL file in production)")
    tls: bool = Field(description="use TLS")
    tls_ca_file: Optional[_ExistingFile] = Field(description="CA bundle for TLS")
    tls_cert_file: Optional[_ExistingFile] = Field(description="client certificate for TLS")
    tls_key_file: Optional[_ExistingFile] = Field(description="client key for TLS")
    connect_timeout_s: Timeout = Field(description="seconds to wait for a connection")
    op_timeout_s: Timeout = Field(description="seconds to wait for one command")
    ttl_s: Optional[Timeout] = Field(description="expire stored chunks after this many seconds (null: never)")
    max_connections: int = Field(ge=1, le=4096, description="connection pool size")
    retry_backoff_s: _FirstBackoff
    retry_backoff_max_s: _LongestBackoff
    key_prefix: Text = Field(description="prefix of every Redis key this plane writes")
    promote: _Promote

    @model_validator(mode="after")
    def _rules_between_keys(self) -> "RedisTierConfig":
        _backoff_in_order(self)
        if self.url.startswith("rediss://") and not self.tls:
            raise KeyProblem("tls", "is false but {section}.url uses rediss:// (set tls: true)")
        return self


_HostPort = Annotated[Text, _refuse(lambda v: None if _HOST_PORT.match(v) else
                                     f"expected host:port (port 1-65535), got {v!r}")]
_HOST_PORT = re.compile(r"^(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|"
                        r"6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$")


class MooncakeTierConfig(Section):
    """``tiers.mooncake``: a Mooncake Store cluster shared by many hosts (docs/mooncake.md)."""

    enabled: bool = Field(description="use the Mooncake Store tier")
    master_address: _HostPort = Field(description="the mooncake_master's RPC address, host:port")
    metadata_server: Text = Field(description="transfer-engine metadata: P2PHANDSHAKE (no server), or an "
                                  "http:// / etcd:// address")
    local_hostname: Text = Field(description="address this client's transfer engine uses (and binds; "
                                 "Mooncake also listens on every address, see docs/mooncake.md)")
    protocol: choice("tcp", "rdma") = Field(description="transport between segments: tcp, or rdma")
    device_names: str = Field(description="RDMA devices to use, comma-separated (\"\" for tcp or "
                              "auto-detection)")
    global_segment_size: Size = Field(ge=0, description="memory this process contributes to the store; "
                                      "0 when a long-lived mooncake_client holds the host's segment, so "
                                      "KV outlives engine restarts")
    local_buffer_size: Size = Field(ge=0, description="this client's transfer buffer")
    replica_num: int = Field(ge=1, le=64, description="copies of each object the master places")
    connect_timeout_s: Timeout = Field(description="seconds to wait for the master's port")
    op_timeout_s: Timeout = Field(description="seconds Mooncake may take for one call (its RPC timeout)")
    retry_backoff_s: _FirstBackoff
    retry_backoff_max_s: _LongestBackoff
    key_prefix: Text = Field(description="prefix of every Mooncake key this plane writes")
    verify_reads: bool = Field(description="check every payload's checksum on read, whatever the caller "
                               "asks")
    metrics_address: _HostPort = Field(description="the master's HTTP metrics address, host:port (stats "
                                       "and inspect read it)")
    promote: _Promote

    @model_validator(mode="after")
    def _rules_between_keys(self) -> "MooncakeTierConfig":
        _backoff_in_order(self)
        return self


class TiersConfig(Section):
    """``tiers``, fastest first; disabled tiers are skipped."""

    cpu: CpuTierConfig
    shared: SharedTierConfig
    disk: DiskTierConfig
    redis: RedisTierConfig
    mooncake: MooncakeTierConfig


class WritebackConfig(Section):
    """``writeback``: the background flusher of write_back links."""

    retry_backoff_s: Seconds = Field(description="first back-off of the write-back flusher after a failed "
                                     "write")
    retry_backoff_max_s: Seconds = Field(description="longest back-off of the write-back flusher")
    max_dirty_bytes: Size = Field(ge=1, description="stores wait for the flusher when this much data is "
                                  "not yet written down")

    @model_validator(mode="after")
    def _rules_between_keys(self) -> "WritebackConfig":
        _backoff_in_order(self)
        return self


def _namespace_section(kind: str) -> type[Section]:
    """The section of one kind of artifact (its own class, so its docs name the kind)."""
    return create_model(
        f"{kind.capitalize()}NamespaceConfig", __base__=Section, __module__=__name__,
        quota=(Optional[Size], Field(description=f"most bytes {kind} objects may take in each tier "
                                                 "(null: no quota)")),
        priority=(int, Field(description=f"eviction priority of {kind} objects: a lower-priority store "
                                         "never evicts them")))


KvNamespaceConfig = _namespace_section("kv")
ParamsNamespaceConfig = _namespace_section("params")
CustomNamespaceConfig = _namespace_section("custom")


class NamespacesConfig(Section):
    """``namespaces``: byte quota and eviction priority per kind of artifact."""

    kv: KvNamespaceConfig
    params: ParamsNamespaceConfig
    custom: CustomNamespaceConfig


class TelemetryConfig(Section):
    """``telemetry``: the opt-in Prometheus endpoint."""

    prometheus: bool = Field(description="serve Prometheus metrics over HTTP (no server starts unless true)")
    host: Text = Field(description="address the metrics server binds (127.0.0.1: this host only)")
    port: int = Field(ge=1, le=65535, description="port of the metrics server")


class ConnectorConfig(Section):
    """``connector``: vLLM's StrataCacheConnectorV1."""

    chunk_size: int = Field(ge=1, description="tokens per stored KV chunk; a multiple of vLLM's block size")
    load_mode: choice("sync", "async", "layerwise") = Field(
        description="sync loads before the forward pass; async finishes through get_finished; layerwise "
                    "overlaps each layer's load with the forward (GPU)")
    save_partial_chunks: bool = Field(description="also store the last, partial chunk of a prompt")
    save_decode_chunks: bool = Field(description="also store the chunks that generated tokens complete, "
                                     "so a chat's next turn, which resends the answer, loads its KV")
    verify_checksums: bool = Field(description="reject a corrupt chunk at load time (vLLM recomputes it)")
    log_stats: bool = Field(description="log connector statistics")
    log_every: int = Field(ge=1, description="log connector stats every N steps")
    log_min_interval_s: Seconds = Field(description="but not more often than this many seconds")
    debug: bool = Field(description="verbose connector logging")
    model_id: Optional[Text] = Field(description="name of the model's weights (e.g. a registry digest); the "
                                     "same string must mean the same weights everywhere. null: fingerprint "
                                     "the weight files")


class StrataConfig(Section):
    """The whole validated config (``cfg.tiers.cpu.capacity`` etc.); ``source`` lists the layers
    it was merged from, lowest first."""

    tiers: TiersConfig
    lease_s: Timeout = Field(description="longest a pin or reader lease holds an object before it expires")
    writeback: WritebackConfig
    namespaces: NamespacesConfig
    telemetry: TelemetryConfig
    connector: ConnectorConfig

    _source: tuple = PrivateAttr(default=())

    @property
    def source(self) -> tuple[str, ...]:
        return self._source


def section_type(field) -> Optional[type[Section]]:
    """The Section class a field holds, or None for a leaf key."""
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, Section) else None


def _set_key_paths(model: type[Section], prefix: str) -> None:
    model.key_path = prefix
    for name, field in model.model_fields.items():
        sub = section_type(field)
        if sub is not None:
            _set_key_paths(sub, f"{prefix}{name}.")


_set_key_paths(StrataConfig, "")
