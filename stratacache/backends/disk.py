"""Local-disk tier: one file per object under a directory, capacity enforced by accounting.

File layout (no pickle): ``ArtifactMeta.pack()`` header, then the encoded key
(u32 length + bytes, compared in full on every read: a file name is only a
hash of the key), then the payload. Files are
``<dir>/<2 hex>/<38 hex of the key hash>.<writer id>.sca``: each put writes a
new file, so a reader of the previous version never sees the new one half-way.

* Writes go to a temp file in the same directory and are renamed into place,
  so a process killed mid-write leaves at most a ``*.tmp`` file, which is
  never read and is removed at the next start.
* Every byte of every file (header, key and payload) is charged to the
  capacity in the ``ObjectTable`` before the file is written; the table is the
  single source of truth, so the directory never grows past its cap.
* Reads verify the payload checksum in the same pass as the read: the native
  ``read_record`` checks the header and size, then preads the payload in 256
  KiB pieces on several threads and sums each piece while it is still in
  cache (csrc/record_file.h), in one call with the GIL released.
  A bad or truncated file is a counted miss and is removed.
* On start the index is rebuilt from the files (headers only), so objects
  survive restarts. One process owns a directory at a time (an flock on
  ``.lock``); ``DiskMemoryLayer.inspect(path)`` reads one without opening it.
* Batched reads and writes run on a small thread pool (``io_threads``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from stratacache.backends.base import EvictCallback
from stratacache.backends.residency import Entry, ObjectTable, TableBackedLayer
from stratacache.core.artifact import Artifact, ArtifactMeta, CorruptArtifact
from stratacache.core.keys import ArtifactKey
from stratacache._C import read_record, write_record
from stratacache.telemetry.metrics import TierCounters

log = logging.getLogger(__name__)

SUFFIX = ".sca"
TMP_MARK = ".tmp"
INFO_FILE = "stratacache-disk.json"
_KEYLEN = struct.Struct("<I")
_MAX_KEY = 1 << 16
_HEAD_READ = ArtifactMeta.header_size(16) + _KEYLEN.size + _MAX_KEY
# read_record statuses (csrc/record_file.h RecordStatus)
_RECORD_OPEN_FAILED, _RECORD_BAD_HEADER, _RECORD_BAD_SIZE, _RECORD_READ_FAILED = 1, 2, 3, 4


class DiskTierError(RuntimeError):
    """The directory cannot be used (in use by another process, not writable)."""


class DiskMemoryLayer(TableBackedLayer):
    persistent = True
    verifies_checksums = True

    def __init__(self, path: str, capacity_bytes: int, *, eviction: str = "lru", io_threads: int = 4,
                 lease_s: float = 30.0, quotas: Optional[dict] = None, priorities: Optional[dict] = None,
                 name: str = "disk"):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.name = name
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        self.capacity_bytes = int(capacity_bytes)
        self.on_evict: Optional[EvictCallback] = None
        self.counters = TierCounters(name)
        self._table = ObjectTable(self.capacity_bytes, eviction, lease_s, quotas, priorities)
        self._free_loc = self._unlink
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DiskTierError(f"tiers.disk.path: cannot use directory {self.path!r}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise DiskTierError(f"tiers.disk.path: directory {self.path!r} is in use by another "
                                "StrataCache process") from None
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="stratacache-disk")
        self._tmp_seq = 0
        self._subdirs: set[str] = set()
        self._tmp_lock = threading.Lock()
        self._write_info()
        self.recovered, self.dropped_at_start = self._rebuild()

    @classmethod
    def from_config(cls, tier_cfg, cfg) -> "DiskMemoryLayer":
        ns = cfg.namespaces
        return cls(tier_cfg.path, tier_cfg.capacity, eviction=tier_cfg.eviction,
                   io_threads=tier_cfg.io_threads, lease_s=cfg.lease_s,
                   quotas={k: ns[k].quota for k in ns}, priorities={k: ns[k].priority for k in ns})

    # -- MemoryLayer -------------------------------------------------------------------

    def _admit(self, key: ArtifactKey, meta: ArtifactMeta) -> Optional[Entry]:
        head = _record_head(key, meta)
        final = self._new_file_for(key)
        return self._table.admit(key, meta, lambda _size: final, self._free_loc, self.on_evict,
                                 self._evict_view, overhead=len(head))

    def _write(self, entry: Entry, data: torch.Tensor) -> bool:
        try:
            self._write_file(entry.loc, _record_head(entry.key, entry.meta), data)
            return True
        except OSError as exc:
            log.warning("disk tier: writing %s failed: %s", entry.loc, exc)
            return False

    def _read(self, entry: Entry, out: Optional[torch.Tensor]) -> Optional[Artifact]:
        try:
            return self._read_file(entry, out)
        except (OSError, CorruptArtifact) as exc:
            log.warning("disk tier: dropping unreadable %s (%s)", entry.loc, exc)
            return None

    def put_many(self, items):
        items = list(items)
        if len(items) <= 1:
            return [self.put(*it) for it in items]
        return list(self._pool.map(lambda it: self.put(*it), items))

    def get_many(self, keys, outs=None):
        keys = list(keys)
        outs = list(outs) if outs is not None else [None] * len(keys)
        if len(keys) <= 1:
            return [self.get(k, o) for k, o in zip(keys, outs)]
        return list(self._pool.map(self.get, keys, outs))

    def stats(self) -> dict:
        with self._table.lock:
            out = self.table_stats()
            out.update(path=self.path, recovered_at_start=self.recovered,
                       dropped_at_start=self.dropped_at_start)
        return out

    def close(self) -> None:
        if self._lock_fd is None:
            return
        self._pool.shutdown(wait=True)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- inspection (read-only, for `stratacache inspect`) ------------------------------

    @classmethod
    def inspect(cls, path: str) -> dict:
        """Summarise a tier directory written by any process, without changing it."""
        root = os.path.abspath(os.path.expanduser(str(path)))
        if not os.path.isdir(root):
            raise DiskTierError(f"{root!r} is not a disk tier directory")
        info = {}
        try:
            with open(os.path.join(root, INFO_FILE)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            pass
        items = used = corrupt = partial = 0
        by_kind: dict = {}
        by_ns: dict = {}
        for fpath in _walk(root):
            if fpath.endswith(TMP_MARK):
                partial += 1
                continue
            try:
                key, meta, nbytes = _read_head(fpath)
            except (OSError, CorruptArtifact):
                corrupt += 1
                continue
            items += 1
            used += nbytes
            k = by_kind.setdefault(key.kind, {"items": 0, "bytes": 0})
            k["items"] += 1
            k["bytes"] += nbytes
            n = by_ns.setdefault(f"{key.kind}/{key.namespace}", {"items": 0, "bytes": 0})
            n["items"] += 1
            n["bytes"] += nbytes
        return {"path": root, "items": items, "used_bytes": used,
                "capacity_bytes": info.get("capacity_bytes"), "eviction": info.get("eviction"),
                "by_kind": by_kind, "by_namespace": by_ns, "unreadable_files": corrupt,
                "partial_writes": partial}

    # -- internals ---------------------------------------------------------------------

    def _new_file_for(self, key: ArtifactKey) -> str:
        with self._tmp_lock:
            self._tmp_seq += 1
            seq = self._tmp_seq
        h = _key_hash(key)
        return os.path.join(self.path, h[:2], f"{h[2:]}.{os.getpid():x}-{seq:x}{SUFFIX}")

    def _write_file(self, final: str, head: bytes, data: torch.Tensor) -> None:
        subdir = os.path.dirname(final)
        if subdir not in self._subdirs:
            os.makedirs(subdir, mode=0o700, exist_ok=True)
            self._subdirs.add(subdir)
        err = write_record(final + TMP_MARK, final, head, data)
        if err:
            raise OSError(err, f"{os.strerror(err)} writing {final}")

    def _read_file(self, entry: Entry, out: Optional[torch.Tensor]) -> Artifact:
        meta = entry.meta
        if out is None:
            dest = torch.empty(meta.size, dtype=torch.uint8)
        else:
            dest = out if out.numel() == meta.size else out.narrow(0, 0, meta.size)
        status, err, got, nread = read_record(entry.loc, _record_head(entry.key, meta), dest)
        if status in (_RECORD_OPEN_FAILED, _RECORD_READ_FAILED):
            raise OSError(err, f"{os.strerror(err)} reading {entry.loc}")
        if status == _RECORD_BAD_HEADER:
            raise CorruptArtifact("header or key does not match the index")
        if status == _RECORD_BAD_SIZE:
            raise CorruptArtifact("file size does not match its header")
        if nread != meta.size:
            raise CorruptArtifact(f"file truncated at {nread} of {meta.size} payload bytes")
        if got != meta.checksum:
            raise CorruptArtifact("payload checksum mismatch")
        return Artifact(meta, dest)

    def _evict_view(self, entry: Entry) -> Artifact:
        return self._read_file(entry, None)

    def _unlink(self, entry: Entry) -> None:
        try:
            os.unlink(entry.loc)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("disk tier: cannot remove %s: %s", entry.loc, exc)

    def _write_info(self) -> None:
        info = {"format": 1, "capacity_bytes": self.capacity_bytes, "eviction": self._table.policy.name}
        tmp = os.path.join(self.path, INFO_FILE + TMP_MARK)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, os.path.join(self.path, INFO_FILE))

    def _rebuild(self) -> tuple[int, int]:
        """Index what is on disk; remove temp files and files that cannot be parsed."""
        found, dropped = [], 0
        for fpath in _walk(self.path):
            if fpath.endswith(TMP_MARK):
                _quiet_unlink(fpath)
                dropped += 1
                continue
            try:
                key, meta, nbytes = _read_head(fpath)
                h = _key_hash(key)
                if os.path.basename(fpath).split(".")[0] != h[2:] or os.path.basename(os.path.dirname(fpath)) != h[:2]:
                    raise CorruptArtifact("file name does not match its key")
            except (OSError, CorruptArtifact):
                _quiet_unlink(fpath)
                dropped += 1
                continue
            found.append((os.stat(fpath).st_mtime, fpath, key, meta, nbytes))
        found.sort()   # oldest first, so recency order survives the restart
        recovered = 0
        for _mtime, fpath, key, meta, nbytes in found:
            entry = self._table.admit(key, meta, lambda _s, p=fpath: p, self._free_loc,
                                      overhead=nbytes - meta.size)
            if entry is None:
                _quiet_unlink(fpath)
                dropped += 1
                continue
            self._table.publish(entry, self._free_loc)   # a newer file of the same key wins
            recovered += 1
        return recovered, dropped


def _key_hash(key: ArtifactKey) -> str:
    return hashlib.blake2b(key.encode(), digest_size=20).hexdigest()


def _record_head(key: ArtifactKey, meta: ArtifactMeta) -> bytes:
    k = key.encode()
    return meta.pack() + _KEYLEN.pack(len(k)) + k


def _read_head(fpath: str) -> tuple[ArtifactKey, ArtifactMeta, int]:
    """(key, meta, file bytes) of a stored file; CorruptArtifact if it is not one of ours."""
    with open(fpath, "rb") as f:
        raw = f.read(_HEAD_READ)
        nbytes = os.fstat(f.fileno()).st_size
    meta, hlen = ArtifactMeta.unpack(raw)
    if len(raw) < hlen + _KEYLEN.size:
        raise CorruptArtifact("truncated key")
    (klen,) = _KEYLEN.unpack_from(raw, hlen)
    start = hlen + _KEYLEN.size
    if klen > _MAX_KEY or len(raw) < start + klen:
        raise CorruptArtifact("bad key length")
    try:
        key = ArtifactKey.decode(bytes(raw[start:start + klen]))
    except ValueError as exc:
        raise CorruptArtifact(str(exc)) from None
    expect = start + klen + meta.size
    if nbytes != expect:
        raise CorruptArtifact(f"file has {nbytes} bytes, header says {expect}")
    return key, meta, nbytes


def _walk(root: str):
    for sub in sorted(os.listdir(root)):
        d = os.path.join(root, sub)
        if len(sub) != 2 or not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.endswith(SUFFIX) or name.endswith(TMP_MARK):
                yield os.path.join(d, name)


def _quiet_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
