"""Model identity from content: a fingerprint of the weight files' bytes.

Two hosts share KV only if their weights are byte-identical, so the identity
is a hash of the weight files themselves, never of a path, an mtime or an
inode. Hashing is done once per file and cached on the host:

* every weight file is cut into segments hashed in parallel (SHA-256, which
  releases the GIL and runs on the CPU's SHA instructions through OpenSSL:
  about twice BLAKE2b's speed on the project's machines); the file digest is the
  SHA-256 of its size and its segment digests, and the model fingerprint the
  SHA-256 of every file's name, size and digest. A collision needs a SHA-256
  collision.
* the cache holds one small JSON entry per file (under
  ``$STRATACACHE_FINGERPRINT_CACHE``, else ``$XDG_CACHE_HOME/stratacache/
  fingerprints``, else ``~/.cache/stratacache/fingerprints``), keyed by the
  file's real path and trusted only while its inode, size and ``st_ctime_ns``
  are unchanged. Every write, rename or ``utime`` changes ``st_ctime_ns`` and
  no user can set it back, so a stale entry is never used. An entry is only
  written when the file's ctime is older than the hash's start by
  ``RACY_MARGIN_NS`` (a write in the same clock tick as the stat could
  otherwise go unseen, the "racy git" problem): such files are hashed again
  next time.
* a file lock per model makes concurrent processes (vLLM's scheduler and its
  workers) hash once: the others wait and then read the cache.

A hub id (``org/name``) is resolved to the snapshot vLLM loaded from the local
Hugging Face cache, and that snapshot's files are hashed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

logger = logging.getLogger("vllm.stratacache")

# What vLLM's loaders read as weights, in their order of preference: safetensors
# when there are any (the .bin copies beside them are then ignored), else PyTorch files.
WEIGHT_SUFFIX_GROUPS = ((".safetensors",), (".bin", ".pt", ".pth"), (".gguf",))
WEIGHT_SUFFIXES = tuple(s for group in WEIGHT_SUFFIX_GROUPS for s in group)
CACHE_ENV = "STRATACACHE_FINGERPRINT_CACHE"
SEGMENT_BYTES = 256 << 20         # unit of parallel hashing within a file
READ_BYTES = 16 << 20             # one read call
RACY_MARGIN_NS = 1_000_000_000    # ctime must be this much older than the hash's start
PROGRESS_EVERY_S = 5.0
_DIGEST_BYTES = 32
_COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelIdentityError(ValueError):
    """The model's weights cannot be found or read, so no identity can be computed."""


def default_cache_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "stratacache" / "fingerprints"


def hub_cache_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """Hugging Face's hub cache, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME)."""
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else \
        Path.home() / ".cache" / "huggingface"
    return home / "hub"


def hub_snapshot(repo_id: str, revision: Optional[str], cache_dir: Path) -> Path:
    """``models--org--name/snapshots/<commit>/`` for ``revision`` (a branch, tag or commit)."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    if _COMMIT.fullmatch(rev):
        commit = rev
    else:
        ref = repo_dir / "refs" / rev
        try:
            commit = ref.read_text().strip()
        except OSError:
            raise ModelIdentityError(
                f"model {repo_id!r} (revision {rev!r}) is neither a local directory nor in the "
                f"Hugging Face cache ({ref} is missing); set connector.model_id to name its "
                "weights explicitly") from None
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        raise ModelIdentityError(f"model {repo_id!r}: snapshot {snapshot} of revision {rev!r} "
                                 "is missing from the Hugging Face cache")
    return snapshot


def weights_root(model: str, revision: Optional[str], download_dir: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None) -> Path:
    """The directory (or single file) whose weights vLLM loaded for ``model``."""
    local = Path(model).expanduser()
    if local.exists():
        return local
    cache = Path(download_dir).expanduser() if download_dir else hub_cache_dir(env)
    return hub_snapshot(model, revision, cache)


def weight_files(root: Path) -> list[Path]:
    """The weight files vLLM reads from ``root`` (top level, its preferred format), sorted."""
    if root.is_file():
        return [root]
    present = [p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    for group in WEIGHT_SUFFIX_GROUPS:
        files = sorted(p for p in present if p.suffix in group)
        if files:
            return files
    raise ModelIdentityError(f"model directory {root} holds no weight files "
                             f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)}); set "
                             "connector.model_id to name the weights explicitly")


@dataclass(frozen=True)
class FileStamp:
    """What must be unchanged for a cached digest to still describe the file."""

    ino: int
    size: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        st = os.stat(path)
        return cls(st.st_ino, st.st_size, st.st_ctime_ns)


class FingerprintCache:
    """Per-file digests on this host; a missing or unwritable directory only costs re-hashing."""

    def __init__(self, directory: Optional[Path]):
        self.directory = directory
        self.writable = False
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.writable = os.access(directory, os.W_OK)
            except OSError:
                self.writable = False
            if not self.writable:
                logger.warning("StrataCache: fingerprint cache %s is not writable; weights are "
                               "hashed again at every start", directory)

    def _entry_path(self, real: str) -> Path:
        return self.directory / (hashlib.sha256(real.encode()).hexdigest()[:40] + ".json")

    def get(self, real: str, stamp: FileStamp) -> Optional[str]:
        if self.directory is None:
            return None
        try:
            entry = json.loads(self._entry_path(real).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("path") != real or \
                entry.get("stamp") != [stamp.ino, stamp.size, stamp.ctime_ns]:
            return None
        digest = entry.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 2 * _DIGEST_BYTES else None

    def put(self, real: str, stamp: FileStamp, digest: str) -> None:
        if not self.writable:
            return
        target = self._entry_path(real)
        tmp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        body = json.dumps({"path": real, "stamp": [stamp.ino, stamp.size, stamp.ctime_ns],
                           "sha256": digest})
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            os.replace(tmp, target)
        except OSError as exc:
            logger.warning("StrataCache: cannot write fingerprint cache entry %s: %s", target, exc)

    @contextmanager
    def lock(self, root: Path) -> Iterator[None]:
        """Exclusive per-model lock, so concurrent processes hash each file once."""
        if not self.writable:
            yield
            return
        name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:40] + ".lock"
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # releases the lock


class _Progress:
    """Bytes hashed so far, logged every PROGRESS_EVERY_S by the waiting thread."""

    def __init__(self):
        self.done = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n


def _hash_segment(path: Path, offset: int, length: int, progress: _Progress) -> bytes:
    h = hashlib.sha256()
    buf = bytearray(min(READ_BYTES, max(length, 1)))
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, end = offset, offset + length
        while pos < end:
            n = os.preadv(fd, [view[:min(len(buf), end - pos)]], pos)
            if n <= 0:
                raise ModelIdentityError(f"weight file {path} shrank while it was hashed")
            h.update(view[:n])
            pos += n
            progress.add(n)
    finally:
        os.close(fd)
    return h.digest()


def _combine_segments(size: int, segments: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    h.update(b"stratacache-file-v1\0" + size.to_bytes(8, "little"))
    for seg in segments:
        h.update(seg)
    return h.hexdigest()


def fingerprint_files(files: Sequence[Path], cache: FingerprintCache, *, label: str = "",
                      workers: Optional[int] = None,
                      clock: Callable[[], int] = time.time_ns) -> str:
    """SHA-256 fingerprint of ``files`` (names, sizes, bytes), using and filling ``cache``.

    ``clock`` gives the wall-clock start of hashing in ns (tests move it to
    exercise the racy-ctime rule).
    """
    started_ns = clock()
    t0 = time.perf_counter()
    reals = [os.path.realpath(p) for p in files]
    stamps = [FileStamp.of(Path(r)) for r in reals]
    digests: list[Optional[str]] = [cache.get(r, s) for r, s in zip(reals, stamps)]
    todo = [i for i, d in enumerate(digests) if d is None]
    if todo:
        total = sum(stamps[i].size for i in todo)
        progress = _Progress()
        logger.info("StrataCache: fingerprinting %s: hashing %d of %d weight files (%.2f GiB); "
                    "later starts read the cache", label or files[0].parent, len(todo),
                    len(files), total / 2**30)
        jobs = [(i, off, min(SEGMENT_BYTES, stamps[i].size - off))
                for i in todo for off in range(0, max(stamps[i].size, 1), SEGMENT_BYTES)]
        n_workers = workers or min(len(jobs), os.cpu_count() or 1, 16)
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="sc-fingerprint") as pool:
            futures = [(i, pool.submit(_hash_segment, Path(reals[i]), off, max(length, 0),
                                       progress)) for i, off, length in jobs]
            last_log = time.perf_counter()
            for _, fut in futures:
                while True:
                    try:
                        fut.result(timeout=PROGRESS_EVERY_S)
                        break
                    except TimeoutError:
                        pass
                    if time.perf_counter() - last_log >= PROGRESS_EVERY_S:
                        last_log = time.perf_counter()
                        logger.info("StrataCache: fingerprinting %s: %.2f / %.2f GiB",
                                    label or files[0].parent, progress.done / 2**30,
                                    total / 2**30)
        segments: dict[int, list[bytes]] = {i: [] for i in todo}
        for i, fut in futures:
            segments[i].append(fut.result())
        for i in todo:
            if FileStamp.of(Path(reals[i])) != stamps[i]:
                raise ModelIdentityError(f"weight file {files[i]} changed while it was hashed")
            digests[i] = _combine_segments(stamps[i].size, segments[i])
            if stamps[i].ctime_ns < started_ns - RACY_MARGIN_NS:
                cache.put(reals[i], stamps[i], digests[i])
        elapsed = time.perf_counter() - t0
        logger.info("StrataCache: fingerprinted %s: %.2f GiB in %.2f s (%.2f GB/s)",
                    label or files[0].parent, total / 2**30, elapsed,
                    total / max(elapsed, 1e-9) / 1e9)
    h = hashlib.sha256()
    h.update(b"stratacache-weights-v1\0")
    for path, stamp, digest in zip(files, stamps, digests):
        h.update(f"{path.name}\0{stamp.size}\0{digest}\0".encode())
    return h.hexdigest()


def weights_fingerprint(model: str, revision: Optional[str] = None, *,
                        download_dir: Optional[str] = None,
                        cache: Optional[FingerprintCache] = None,
                        env: Optional[Mapping[str, str]] = None) -> str:
    """``sha256:<hex>`` of the weights vLLM loaded for ``model`` (a path or a hub id)."""
    root = weights_root(model, revision, download_dir, env)
    cache = cache if cache is not None else FingerprintCache(default_cache_dir(env))
    files = weight_files(root)
    try:
        with cache.lock(root):
            return "sha256:" + fingerprint_files(files, cache, label=model)
    except OSError as exc:
        raise ModelIdentityError(f"cannot read the weights of {model} ({root}): {exc}") from None
