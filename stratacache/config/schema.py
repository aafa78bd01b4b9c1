"""The config schema: every key of config.yaml, its type, range and meaning.

The schema is the single description of what a valid config is. Defaults live
in the packaged ``default.yaml`` (the repo's config.yaml); the schema checks
that file like any other, so the two cannot drift apart silently.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit


class ConfigError(ValueError):
    """An invalid config; the message starts with the offending key path."""


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


@dataclass(frozen=True)
class Key:
    """One leaf key: how to check and normalise its value, and what it means."""

    kind: str                                  # bool|int|float|size|str|path|choice|file_mode
    doc: str
    nullable: bool = False
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: tuple = ()
    check: Optional[Callable[[Any], Optional[str]]] = None   # extra check -> error text

    @property
    def type_name(self) -> str:
        name = {"size": "size (e.g. 4GiB)", "file_mode": "octal string (e.g. \"0600\")",
                "path": "absolute path (~ and $VARS expanded)"}.get(self.kind, self.kind)
        if self.kind == "choice":
            name = " | ".join(_show(c) for c in self.choices)
        return name + (" or null" if self.nullable else "")

    def normalise(self, value: Any) -> Any:
        """The validated value, or ValueError saying what is wrong with it."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError("got null, which is not allowed here")
        out = _CONVERTERS[self.kind](self, value)
        if self.minimum is not None and out < self.minimum:
            raise ValueError(f"{_show(value)} is below the minimum {_show(self.minimum)}")
        if self.maximum is not None and out > self.maximum:
            raise ValueError(f"{_show(value)} is above the maximum {_show(self.maximum)}")
        if self.check is not None:
            problem = self.check(out)
            if problem:
                raise ValueError(problem)
        return out


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, str) else str(v)


def _to_bool(key: Key, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {type(v).__name__} {_show(v)}")
    return v


def _to_int(key: Key, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {type(v).__name__} {_show(v)}")
    return v


def _to_float(key: Key, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"expected a number, got {type(v).__name__} {_show(v)}")
    return float(v)


def _to_str(key: Key, v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__} {_show(v)}")
    if not v.strip():
        raise ValueError(f"got the empty string {v!r}")
    return v


def _to_choice(key: Key, v: Any) -> Any:
    for c in key.choices:
        if type(c) is type(v) and c == v:
            return c
    raise ValueError(f"{_show(v)} is not one of {', '.join(_show(c) for c in key.choices)}")


def _to_size(key: Key, v: Any) -> int:
    return parse_size(v)


def _to_file_mode(key: Key, v: Any) -> int:
    if not isinstance(v, str) or not re.fullmatch(r"0?[0-7]{3}", v):
        raise ValueError(f"expected an octal permission string such as \"0600\", got {_show(v)} "
                         "(quote it in YAML so it stays a string)")
    mode = int(v, 8)
    if mode & 0o007:
        raise ValueError(f"{v!r} gives access to all users; shared files must not be world-accessible")
    if mode & 0o600 != 0o600:
        raise ValueError(f"{v!r} does not let the owner read and write the file (use \"0600\" "
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


def _to_path(key: Key, v: Any) -> str:
    return expand_path(_to_str(key, v))


_CONVERTERS = {
    "bool": _to_bool, "int": _to_int, "float": _to_float, "str": _to_str,
    "choice": _to_choice, "size": _to_size, "file_mode": _to_file_mode, "path": _to_path,
}


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


def _cpu_arena_fits(config: dict) -> Optional[str]:
    from stratacache.backends.cpu import arena_bytes

    cpu = config["tiers"]["cpu"]
    limit = _host_allocatable()
    capacity = cpu["capacity"]
    need = arena_bytes(capacity)
    if not cpu["enabled"]:
        return None
    if limit is not None and need > limit:
        return (f"{capacity} bytes (an arena of {need} bytes) cannot be reserved on this host: "
                f"it allows at most {limit} bytes in one allocation (RAM + swap under the "
                "kernel's overcommit policy)")
    return None


# ----------------------------------------------------------------- the schema

_WRITE_POLICY = Key("choice", "how stores reach the next enabled tier below: write_through stores there "
                    "before acknowledging; write_back acknowledges at once and a background flusher "
                    "writes the object down", choices=("write_through", "write_back"))
_PROMOTE = Key("bool", "copy an object found in a lower tier into this tier on a chain read")
_DEMOTE = Key("bool", "write objects evicted from this tier into the next tier even under write_through")
_EVICTION = Key("choice", "eviction policy: lru, or s3fifo (scan-resistant)", choices=("lru", "s3fifo"))
_POSITIVE_SIZE = dict(minimum=1)

SCHEMA: dict = {
    "tiers": {
        "cpu": {
            "enabled": Key("bool", "use the per-process CPU arena tier"),
            "capacity": Key("size", "bytes of payload the CPU arena holds (reserved lazily); with "
                            "1/16 slack, at most what one allocation may reserve on the host (RAM + swap "
                            "under the default overcommit policy)", **_POSITIVE_SIZE),
            "eviction": _EVICTION,
            "pin_memory": Key("choice", "page-lock the arena for fast GPU copies: auto pins when CUDA is present",
                              choices=("auto", True, False)),
            "write_policy": _WRITE_POLICY,
            "promote": _PROMOTE,
            "demote_on_evict": _DEMOTE,
        },
        "shared": {
            "enabled": Key("bool", "use the host-wide shared region tier (shm or CXL)"),
            "path": Key("path", "/dev/shm file, file on a DAX filesystem, or /dev/daxX.Y device", check=_region_path),
            "capacity": Key("size", "bytes of payload the shared region holds", **_POSITIVE_SIZE),
            "max_objects": Key("int", "index slots in the region", minimum=1, maximum=2**30),
            "numa_node": Key("int", "bind the region's memory to this NUMA node (CXL as a CPU-less node)",
                             nullable=True, minimum=0),
            "file_mode": Key("file_mode", "permissions of the region file: \"0600\", or \"0660\" to share with "
                             "a group; the owner must read and write, others get nothing"),
            "reset": Key("bool", "wipe the region at start-up instead of reusing its contents"),
            "prefault": Key("size", "bytes of stored objects whose pages a vLLM worker maps in the background "
                            "when it attaches, so its first hits take no page faults; 0 disables",
                            minimum=0),
            "register_cuda": Key("choice", "page-lock the region for one-copy GPU transfers "
                                 "(cudaHostRegister): auto when CUDA is present; vLLM's scheduler "
                                 "process always opens it unregistered", choices=("auto", True, False)),
            "write_policy": _WRITE_POLICY,
            "promote": _PROMOTE,
            "demote_on_evict": _DEMOTE,
        },
        "disk": {
            "enabled": Key("bool", "use the local-disk tier"),
            "path": Key("path", "directory holding the tier's files (created 0700 if missing)", check=_dir_path),
            "capacity": Key("size", "bytes of payload the directory may hold; never exceeded", **_POSITIVE_SIZE),
            "eviction": _EVICTION,
            "io_threads": Key("int", "threads doing file I/O", minimum=1, maximum=256),
            "write_policy": _WRITE_POLICY,
            "promote": _PROMOTE,
            "demote_on_evict": _DEMOTE,
        },
        "redis": {
            "enabled": Key("bool", "use the Redis / Redis Cluster tier"),
            "url": Key("str", "server URL: redis://host:port/db (port 1-65535, db a number), rediss:// "
                       "for TLS, or unix:///path; a cluster takes comma-separated seeds",
                       check=redis_url_problem),
            "cluster": Key("bool", "talk to a Redis Cluster (Valkey) instead of a single server"),
            "username": Key("str", "ACL user name", nullable=True),
            "password": Key("str", "password (prefer the URL or an ACL file in production)", nullable=True),
            "tls": Key("bool", "use TLS"),
            "tls_ca_file": Key("path", "CA bundle for TLS", nullable=True, check=_existing_file),
            "tls_cert_file": Key("path", "client certificate for TLS", nullable=True, check=_existing_file),
            "tls_key_file": Key("path", "client key for TLS", nullable=True, check=_existing_file),
            "connect_timeout_s": Key("float", "seconds to wait for a connection", minimum=0.001),
            "op_timeout_s": Key("float", "seconds to wait for one command", minimum=0.001),
            "ttl_s": Key("float", "expire stored chunks after this many seconds (null: never)",
                         nullable=True, minimum=0.001),
            "max_connections": Key("int", "connection pool size", minimum=1, maximum=4096),
            "retry_backoff_s": Key("float", "first back-off after a failure; doubles up to the max", minimum=0.0),
            "retry_backoff_max_s": Key("float", "longest back-off after repeated failures", minimum=0.0),
            "key_prefix": Key("str", "prefix of every Redis key this plane writes"),
            "promote": _PROMOTE,
        },
    },
    "lease_s": Key("float", "longest a pin or reader lease holds an object before it expires", minimum=0.001),
    "writeback": {
        "retry_backoff_s": Key("float", "first back-off of the write-back flusher after a failed write", minimum=0.0),
        "retry_backoff_max_s": Key("float", "longest back-off of the write-back flusher", minimum=0.0),
        "max_dirty_bytes": Key("size", "stores wait for the flusher when this much data is not yet written down",
                               **_POSITIVE_SIZE),
    },
    "namespaces": {
        kind: {
            "quota": Key("size", f"most bytes {kind} objects may take in each tier (null: no quota)", nullable=True),
            "priority": Key("int", f"eviction priority of {kind} objects: a lower-priority store never evicts them"),
        }
        for kind in ("kv", "params", "custom")
    },
    "telemetry": {
        "prometheus": Key("bool", "serve Prometheus metrics over HTTP (no server starts unless true)"),
        "host": Key("str", "address the metrics server binds (127.0.0.1: this host only)"),
        "port": Key("int", "port of the metrics server", minimum=1, maximum=65535),
    },
    "connector": {
        "chunk_size": Key("int", "tokens per stored KV chunk; a multiple of vLLM's block size", minimum=1),
        "load_mode": Key("choice", "sync loads before the forward pass; async finishes through "
                         "get_finished; layerwise overlaps each layer's load with the forward (GPU)",
                         choices=("sync", "async", "layerwise")),
        "save_partial_chunks": Key("bool", "also store the last, partial chunk of a prompt"),
        "verify_checksums": Key("bool", "reject a corrupt chunk at load time (vLLM recomputes it)"),
        "log_stats": Key("bool", "log connector statistics"),
        "log_every": Key("int", "log connector stats every N steps", minimum=1),
        "log_min_interval_s": Key("float", "but not more often than this many seconds", minimum=0.0),
        "debug": Key("bool", "verbose connector logging"),
        "model_id": Key("str", "name of the model's weights (e.g. a registry digest); the same "
                        "string must mean the same weights everywhere. null: fingerprint the "
                        "weight files", nullable=True),
    },
}

# Checks between keys: (path of the key reported, predicate on the whole config, message)
CROSS_CHECKS = [
    ("tiers.redis.retry_backoff_max_s",
     lambda c: c["tiers"]["redis"]["retry_backoff_max_s"] >= c["tiers"]["redis"]["retry_backoff_s"],
     "must be >= tiers.redis.retry_backoff_s"),
    ("writeback.retry_backoff_max_s",
     lambda c: c["writeback"]["retry_backoff_max_s"] >= c["writeback"]["retry_backoff_s"],
     "must be >= writeback.retry_backoff_s"),
    ("tiers.redis.tls",
     lambda c: c["tiers"]["redis"]["tls"] or not c["tiers"]["redis"]["url"].startswith("rediss://"),
     "is false but tiers.redis.url uses rediss:// (set tls: true)"),
]

# Checks against this host, of the tiers that are enabled: (key path, problem(config) -> text).
HOST_CHECKS = [
    ("tiers.cpu.capacity", _cpu_arena_fits),
]
