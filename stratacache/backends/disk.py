"""Local-disk tier: one file per object under a directory, capacity enforced by accounting.

File layout (no pickle): ``ArtifactMeta.pack(key)`` header (its checksum
covers dtype, shape, size, the payload checksum and the key), then the encoded
key (u32 length + bytes, at most 64 KiB, compared in full on every read: a file
name is only a hash of the key), then the payload. Files are
``<dir>/<2 hex>/<38 hex of the key hash>.<writer id>.sca``: each put writes a
new file, so a reader of the previous version never sees the new one half-way.

* Everything below the tier directory is opened relative to directory file
  descriptors with ``O_NOFOLLOW``: a symbolic link planted inside the tier
  (as a subdirectory or a file) is refused, never followed. A tier directory
  that others can write to (mode o+w) is refused.

* Writes go to a temp file in the same directory and are renamed into place,
  so a process killed mid-write leaves at most a ``*.tmp`` file, which is
  never read and is removed at the next start.
* Every file is charged to the capacity in the ``ObjectTable`` before it is
  written, as the filesystem blocks it occupies (header, key and payload
  rounded up to the block size), so ``du`` of the objects never exceeds the
  cap even for tiny objects; the table is the single source of truth. The
  directories themselves (the root and at most 256 subdirectories) are not
  charged.
* Reads verify the payload checksum in the same pass as the read: the native
  ``read_record`` checks the header and size, then preads the payload in 256
  KiB pieces on several threads and sums each piece while it is still in
  cache (csrc/record_file.h), in one call with the GIL released.
  A bad or truncated file is a counted miss and is removed.
* On start the index is rebuilt from the files (headers only), so objects
  survive restarts; ``recovered``/``dropped`` count the files kept and the
  files removed (unreadable, superseded, or over a smaller cap). One process owns a directory at a time (an flock on
  ``.lock``); ``DiskTier.inspect(section, cfg)`` reads one without opening it.
* Batched reads and writes run on a small thread pool (``io_threads``).
* Not zero-copy: ``acquire`` hands out an owned copy (read and verified like a get).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from stratacache.backends.base import fit_out, inspect_report
from stratacache.backends.residency import Entry, ObjectTable, TableTier
from stratacache.core.artifact import Artifact, ArtifactMeta, CorruptArtifact
from stratacache.core.errors import ConfigError, InvalidArgument
from stratacache.core.keys import ArtifactKey
from stratacache._C import read_record, write_record

log = logging.getLogger(__name__)

SUFFIX = ".sca"
TMP_MARK = ".tmp"
INFO_FILE = "stratacache-disk.json"
_KEYLEN = struct.Struct("<I")
_MAX_KEY = 1 << 16
_HEAD_READ = ArtifactMeta.header_size(16) + _KEYLEN.size + _MAX_KEY
# read_record statuses (csrc/record_file.h RecordStatus)
_RECORD_OPEN_FAILED, _RECORD_BAD_HEADER, _RECORD_BAD_SIZE, _RECORD_READ_FAILED = 1, 2, 3, 4


class DiskTierError(ConfigError):
    """The directory cannot be used (in use by another process, not writable, open to all)."""


class DiskTier(TableTier):
    """One file per object under a directory; persists across restarts."""

    persistent = True
    inspectable = True
    verifies_checksums = True   # the native read checksums the payload while reading it

    def __init__(self, path: str, capacity_bytes: int, *, eviction: str = "lru", io_threads: int = 4,
                 lease_s: float = 30.0, quotas: Optional[dict] = None, priorities: Optional[dict] = None,
                 name: str = "disk"):
        if capacity_bytes <= 0:
            raise InvalidArgument(f"capacity_bytes must be positive, got {capacity_bytes}")
        super().__init__(name, capacity_bytes)
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        self._table = ObjectTable(self.capacity_bytes, eviction, lease_s, quotas, priorities)
        self._free_loc = self._unlink
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self._root_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskTierError(f"tiers.disk.path: cannot use directory {self.path!r}: {exc.strerror}") from None
        try:
            _check_dir_mode(self.path, os.fstat(self._root_fd))
            self._lock_fd = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                    dir_fd=self._root_fd)
        except OSError as exc:
            os.close(self._root_fd)
            raise DiskTierError(f"tiers.disk.path: cannot use directory {self.path!r}: {exc.strerror}") from None
        except DiskTierError:
            os.close(self._root_fd)
            raise
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            os.close(self._root_fd)
            raise DiskTierError(f"tiers.disk.path: directory {self.path!r} is in use by another "
                                "StrataCache process") from None
        self._block = os.fstatvfs(self._root_fd).f_frsize or 4096
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="stratacache-disk")
        self._tmp_seq = 0
        self._subdir_fds: dict[str, int] = {}
        self._tmp_lock = threading.Lock()
        self._write_info()
        self.recovered, self.dropped_at_start = self._rebuild()

    @classmethod
    def from_config(cls, section, cfg) -> "DiskTier":
        ns = cfg.namespaces
        return cls(section.path, section.capacity, eviction=section.eviction,
                   io_threads=section.io_threads, lease_s=cfg.lease_s,
                   quotas={k: ns[k].quota for k in ns}, priorities={k: ns[k].priority for k in ns})

    # -- TableTier ---------------------------------------------------------------------

    def _admit(self, key: ArtifactKey, meta: ArtifactMeta) -> Optional[Entry]:
        raw = key.encode()
        if len(raw) > _MAX_KEY:   # a restart could not read it back: refuse it now
            log.warning("disk tier: refusing %s: its key is %d bytes, at most %d are stored",
                        key, len(raw), _MAX_KEY)
            return None
        head = _record_head(key, meta)
        final = self._new_file_for(key)
        return self._table.admit(key, meta, lambda _size: final, self._free_loc, self.on_evict,
                                 self._evict_view, overhead=self._charge(len(head) + meta.size) - meta.size)

    def _write(self, entry: Entry, data: torch.Tensor) -> bool:
        try:
            self._write_file(entry.loc, _record_head(entry.key, entry.meta), data)
            return True
        except OSError as exc:
            log.warning("disk tier: writing %s failed: %s", entry.loc, exc)
            self.counters.add("errors")
            return False

    def _read(self, entry: Entry, out: Optional[torch.Tensor]) -> Artifact:
        try:
            return self._read_file(entry, out)
        except OSError as exc:   # vanished or unreadable: it cannot be served, so it goes too
            raise CorruptArtifact(f"cannot read {entry.loc}: {exc}") from None

    def _put_many(self, items) -> list[bool]:
        if len(items) <= 1:
            return [self._put(*it) for it in items]
        return list(self._pool.map(lambda it: self._put(*it), items))

    def _get_many(self, keys, outs) -> list:
        keys = list(keys)
        outs = list(outs) if outs is not None else [None] * len(keys)
        if len(keys) <= 1:
            return super()._get_many(keys, outs)
        return list(self._pool.map(self._get_or_corrupt, keys, outs))

    def _get_or_corrupt(self, key: ArtifactKey, out: Optional[torch.Tensor]):
        try:
            return self._get(key, out)
        except CorruptArtifact as exc:
            return exc

    def _stats(self) -> dict:
        out = super()._stats()
        out.update(path=self.path, recovered_at_start=self.recovered,
                   dropped_at_start=self.dropped_at_start)
        return out

    def close(self) -> None:
        if self._lock_fd is None:
            return
        self._pool.shutdown(wait=True)
        with self._tmp_lock:
            for fd in self._subdir_fds.values():
                os.close(fd)
            self._subdir_fds.clear()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        os.close(self._root_fd)
        self._lock_fd = None

    # -- inspection (read-only, for `stratacache inspect`) ------------------------------

    @classmethod
    def inspect(cls, section, cfg) -> dict:
        """Summarise the tier directory ``section.path``, written by any process, without
        changing it (no lock taken: a running tier may hold it)."""
        root = os.path.abspath(os.path.expanduser(str(section.path)))
        try:
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise DiskTierError(f"tiers.disk.path: {root!r} is not a disk tier directory") from None
        info = {}
        try:
            fd = os.open(INFO_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
            with os.fdopen(fd) as f:
                info = json.load(f)
        except (OSError, ValueError):
            pass
        block = os.fstatvfs(root_fd).f_frsize or 4096
        entries, corrupt, partial = [], 0, 0
        try:
            for dir_fd, _sub, name in _walk(root_fd, root):
                if name.endswith(TMP_MARK):
                    partial += 1
                    continue
                try:
                    key, _meta, nbytes = _read_head(dir_fd, name)
                except (OSError, CorruptArtifact):
                    corrupt += 1
                    continue
                entries.append((key, _round_up(nbytes, block)))
        finally:
            os.close(root_fd)
        return inspect_report("disk", root, capacity_bytes=info.get("capacity_bytes", section.capacity),
                              entries=entries, unreadable=corrupt, eviction=info.get("eviction"),
                              partial_writes=partial)

    # -- internals ---------------------------------------------------------------------

    def _new_file_for(self, key: ArtifactKey) -> str:
        with self._tmp_lock:
            self._tmp_seq += 1
            seq = self._tmp_seq
        h = _key_hash(key)
        return os.path.join(self.path, h[:2], f"{h[2:]}.{os.getpid():x}-{seq:x}{SUFFIX}")

    def _charge(self, nbytes: int) -> int:
        """Bytes a file of ``nbytes`` occupies: whole filesystem blocks (what ``du`` counts)."""
        return _round_up(nbytes, self._block)

    def _dir_fd(self, sub: str, create: bool = True) -> int:
        """A descriptor of the subdirectory ``sub`` of the tier root, created 0700 if
        missing; a symbolic link there is refused (OSError ELOOP/ENOTDIR), not followed."""
        with self._tmp_lock:
            fd = self._subdir_fds.get(sub)
            if fd is not None:
                return fd
            if create:
                try:
                    os.mkdir(sub, 0o700, dir_fd=self._root_fd)
                except FileExistsError:
                    pass
            fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._root_fd)
            self._subdir_fds[sub] = fd
            return fd

    def _write_file(self, final: str, head: bytes, data: torch.Tensor) -> None:
        sub, name = _split_loc(final)
        err = write_record(name + TMP_MARK, name, head, data, dir_fd=self._dir_fd(sub))
        if err:
            raise OSError(err, f"{os.strerror(err)} writing {final}")

    def _read_file(self, entry: Entry, out: Optional[torch.Tensor]) -> Artifact:
        meta = entry.meta
        dest = torch.empty(meta.size, dtype=torch.uint8) if out is None else fit_out(out, meta.size)
        sub, name = _split_loc(entry.loc)
        status, err, got, nread = read_record(name, _record_head(entry.key, meta), dest,
                                              dir_fd=self._dir_fd(sub, create=False))
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
        sub, name = _split_loc(entry.loc)
        try:
            os.unlink(name, dir_fd=self._dir_fd(sub, create=False))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("disk tier: cannot remove %s: %s", entry.loc, exc)

    def _write_info(self) -> None:
        info = {"format": 1, "capacity_bytes": self.capacity_bytes, "eviction": self._table.policy.name}
        tmp = INFO_FILE + TMP_MARK
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._root_fd)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, INFO_FILE, src_dir_fd=self._root_fd, dst_dir_fd=self._root_fd)

    def _rebuild(self) -> tuple[int, int]:
        """Index what is on disk; remove temp files and files that cannot be parsed.
        Returns (files kept, files removed): a file superseded by a newer one of the
        same key, or evicted to fit a smaller cap, counts as removed."""
        found, dropped = [], 0
        for dir_fd, sub, name in _walk(self._root_fd, self.path, self._dir_fd):
            if name.endswith(TMP_MARK):
                _quiet_unlink(dir_fd, name)
                dropped += 1
                continue
            try:
                key, meta, nbytes = _read_head(dir_fd, name)
                h = _key_hash(key)
                if name.split(".")[0] != h[2:] or sub != h[:2]:
                    raise CorruptArtifact("file name does not match its key")
                mtime = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
            except (OSError, CorruptArtifact):
                _quiet_unlink(dir_fd, name)
                dropped += 1
                continue
            found.append((mtime, os.path.join(self.path, sub, name), key, meta, nbytes))
        found.sort()   # oldest first, so recency order survives the restart
        for _mtime, fpath, key, meta, nbytes in found:
            entry = self._table.admit(key, meta, lambda _s, p=fpath: p, self._free_loc,
                                      overhead=self._charge(nbytes) - meta.size)
            if entry is None:
                self._unlink_path(fpath)
                continue
            self._table.publish(entry, self._free_loc)   # a newer file of the same key wins
        recovered = len(self._table.entries)
        return recovered, dropped + len(found) - recovered

    def _unlink_path(self, fpath: str) -> None:
        sub, name = _split_loc(fpath)
        _quiet_unlink(self._dir_fd(sub, create=False), name)


def _key_hash(key: ArtifactKey) -> str:
    return hashlib.blake2b(key.encode(), digest_size=20).hexdigest()


def _record_head(key: ArtifactKey, meta: ArtifactMeta) -> bytes:
    k = key.encode()
    return meta.pack(k) + _KEYLEN.pack(len(k)) + k


def _read_head(dir_fd: int, name: str) -> tuple[ArtifactKey, ArtifactMeta, int]:
    """(key, meta, file bytes) of a stored file; CorruptArtifact if it is not one of ours."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_HEAD_READ)
        nbytes = os.fstat(f.fileno()).st_size
    hlen = ArtifactMeta.header_length(raw)
    if len(raw) < hlen + _KEYLEN.size:
        raise CorruptArtifact("truncated key")
    (klen,) = _KEYLEN.unpack_from(raw, hlen)
    start = hlen + _KEYLEN.size
    if klen > _MAX_KEY or len(raw) < start + klen:
        raise CorruptArtifact("bad key length")
    raw_key = bytes(raw[start:start + klen])
    meta, _ = ArtifactMeta.unpack(raw, raw_key)
    try:
        key = ArtifactKey.decode(raw_key)
    except ValueError as exc:
        raise CorruptArtifact(str(exc)) from None
    expect = start + klen + meta.size
    if nbytes != expect:
        raise CorruptArtifact(f"file has {nbytes} bytes, header says {expect}")
    return key, meta, nbytes


def _walk(root_fd: int, root: str, dir_fd=None):
    """(directory fd, subdirectory, file name) of every object and temp file. A
    symbolic link where a subdirectory belongs is refused (logged), not followed.
    ``dir_fd(sub, create=False)`` opens subdirectories; without it each is opened
    and closed here."""
    for sub in sorted(os.listdir(root_fd)):
        if len(sub) != 2:
            continue
        try:
            st = os.stat(sub, dir_fd=root_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            log.warning("disk tier: ignoring %s: a symbolic link inside the tier directory",
                        os.path.join(root, sub))
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        try:
            fd = dir_fd(sub, create=False) if dir_fd else os.open(
                sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError:
            continue
        try:
            for name in sorted(os.listdir(fd)):
                if name.endswith(SUFFIX) or name.endswith(TMP_MARK):
                    yield fd, sub, name
        finally:
            if not dir_fd:
                os.close(fd)


def _split_loc(loc: str) -> tuple[str, str]:
    """(subdirectory, file name) of an object file path."""
    return os.path.basename(os.path.dirname(loc)), os.path.basename(loc)


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _check_dir_mode(path: str, st: os.stat_result) -> None:
    """Refuse a tier directory others can write to (they could plant files or links);
    warn when others can read it."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002:
        raise DiskTierError(f"tiers.disk.path: directory {path!r} has mode {mode:04o}, writable by "
                            f"every user; run chmod 700 {path!r} (or use a new directory)")
    if mode & 0o077:
        log.warning("disk tier: directory %s has mode %04o; other users can see its objects' "
                    "names (chmod 700 it to keep them private)", path, mode)


def _quiet_unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
