"""Weights fingerprint (adapters/vllm/model_identity.py): content, not path, mtime or inode.

Real files with random bytes; the per-host cache is a real directory. The
cache's "racy ctime" rule is driven by an injected clock, not by sleeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stratacache.adapters.vllm import model_identity as mi
from stratacache.adapters.vllm.model_identity import (
    CACHE_ENV,
    FingerprintCache,
    ModelIdentityError,
    fingerprint_files,
    weight_files,
    weights_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]
LATER = lambda: time.time_ns() + 3_600 * 10**9   # noqa: E731 - files look an hour old: cacheable


def _write_model(directory: Path, shards: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    for name, data in shards.items():
        (directory / name).write_bytes(data)
    return directory


def _shards(seed: int, sizes=(70_001, 3 << 20)) -> dict[str, bytes]:
    rng = __import__("random").Random(seed)
    return {f"model-{i:05d}.safetensors": rng.randbytes(n) for i, n in enumerate(sizes)}


@pytest.fixture
def count_hashing(monkeypatch):
    """Counts the segments actually read and hashed."""
    calls = []
    real = mi._hash_segment

    def counted(path, offset, length, progress):
        calls.append((Path(path).name, offset, length))
        return real(path, offset, length, progress)

    monkeypatch.setattr(mi, "_hash_segment", counted)
    return calls


def test_same_bytes_elsewhere_later_give_the_same_fingerprint(tmp_path):
    """Two "hosts": separate directories, caches, write times, mtimes and inodes."""
    shards = _shards(1)
    a = _write_model(tmp_path / "host-a" / "models" / "llama", shards)
    b = _write_model(tmp_path / "host-b" / "elsewhere" / "copy-of-llama", shards)
    for i, f in enumerate(sorted(b.glob("*.safetensors"))):
        os.utime(f, ns=(10**18 + i, 10**18 + i))    # a copy made without -p, on another day
    fa = fingerprint_files(weight_files(a), FingerprintCache(tmp_path / "cache-a"), clock=LATER)
    fb = fingerprint_files(weight_files(b), FingerprintCache(tmp_path / "cache-b"), clock=LATER)
    assert fa == fb and len(fa) == 64
    assert os.stat(a / "model-00000.safetensors").st_ino != os.stat(b / "model-00000.safetensors").st_ino


def test_different_bytes_same_size_same_mtime_same_inode_differ(tmp_path, count_hashing):
    """The worst case for a stat-keyed cache: an in-place rewrite with the mtime set back."""
    model = _write_model(tmp_path / "m", _shards(1))
    cache = FingerprintCache(tmp_path / "cache")
    first = fingerprint_files(weight_files(model), cache, clock=LATER)
    target = model / "model-00001.safetensors"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01                       # one bit, mid-file
    with open(target, "r+b") as fh:                    # same inode
        fh.write(data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    count_hashing.clear()
    second = fingerprint_files(weight_files(model), cache, clock=LATER)
    assert second != first
    assert {name for name, _, _ in count_hashing} == {"model-00001.safetensors"}  # only it re-hashed


def test_warm_cache_reads_no_weight_bytes(tmp_path, count_hashing):
    model = _write_model(tmp_path / "m", _shards(2))
    cache_dir = tmp_path / "cache"
    first = fingerprint_files(weight_files(model), FingerprintCache(cache_dir), clock=LATER)
    assert count_hashing
    count_hashing.clear()
    assert fingerprint_files(weight_files(model), FingerprintCache(cache_dir), clock=LATER) == first
    assert count_hashing == []
    entries = sorted(cache_dir.glob("*.json"))
    assert len(entries) == 2
    assert all(e.stat().st_mode & 0o777 == 0o600 for e in entries)
    assert {json.loads(e.read_text())["path"] for e in entries} == \
        {os.path.realpath(f) for f in model.glob("*.safetensors")}


def test_file_changed_within_the_clock_margin_is_not_cached(tmp_path, count_hashing):
    """A file whose ctime is not older than the hash's start by the margin is hashed again."""
    model = _write_model(tmp_path / "m", _shards(3))
    cache = FingerprintCache(tmp_path / "cache")
    newest = max(f.stat().st_ctime_ns for f in model.glob("*.safetensors"))
    just_after = lambda: newest + mi.RACY_MARGIN_NS // 2   # noqa: E731
    first = fingerprint_files(weight_files(model), cache, clock=just_after)
    assert list((tmp_path / "cache").glob("*.json")) == []
    count_hashing.clear()
    assert fingerprint_files(weight_files(model), cache, clock=LATER) == first
    assert len({name for name, _, _ in count_hashing}) == 2


def test_segmented_digest_matches_its_definition(tmp_path, monkeypatch):
    monkeypatch.setattr(mi, "SEGMENT_BYTES", 1 << 20)
    monkeypatch.setattr(mi, "READ_BYTES", 100_000)
    data = os.urandom((5 << 20) + 12_345)
    model = _write_model(tmp_path / "m", {"model.safetensors": data})
    got = fingerprint_files(weight_files(model), FingerprintCache(None), workers=4)

    sha = hashlib.sha256
    segments = b"".join(sha(data[o:o + (1 << 20)]).digest() for o in range(0, len(data), 1 << 20))
    file_digest = sha(b"stratacache-file-v1\0" + len(data).to_bytes(8, "little") + segments)
    want = sha(b"stratacache-weights-v1\0" +
              f"model.safetensors\0{len(data)}\0{file_digest.hexdigest()}\0".encode())
    assert got == want.hexdigest()
    # A change in the last byte of the last segment changes it.
    (model / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 0x80]))
    assert fingerprint_files(weight_files(model), FingerprintCache(None)) != got


def test_progress_and_totals_are_logged(tmp_path, caplog):
    model = _write_model(tmp_path / "m", _shards(4))
    with caplog.at_level("INFO", logger="vllm.stratacache"):
        fingerprint_files(weight_files(model), FingerprintCache(None), label="my-model")
    text = caplog.text
    assert "fingerprinting my-model: hashing 2 of 2 weight files" in text
    assert "fingerprinted my-model:" in text and "GB/s" in text


def _hub_repo(hub: Path, repo: str, commit: str, shards: dict[str, bytes], ref: str = "main"):
    """A snapshot laid out like huggingface_hub's cache: files are symlinks into blobs/."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name, data in {**shards, "config.json": b"{}"}.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snap


def test_hub_id_uses_the_snapshot_content_and_a_new_commit_changes_it(tmp_path):
    hub = tmp_path / "hf" / "hub"
    env = {"HF_HUB_CACHE": str(hub), CACHE_ENV: str(tmp_path / "cache")}
    c1, c2 = "1" * 40, "2" * 40
    old = _shards(5)
    _hub_repo(hub, "org/name", c1, old)
    at_c1 = weights_fingerprint("org/name", None, env=env)
    # The same bytes as a plain local directory: the same identity (content, not location).
    local = _write_model(tmp_path / "local", old)
    assert weights_fingerprint(str(local), None, env=env) == at_c1
    # Upstream pushes new weights: refs/main moves to a new commit.
    _hub_repo(hub, "org/name", c2, _shards(6))
    at_c2 = weights_fingerprint("org/name", None, env=env)
    assert at_c2 != at_c1 and at_c2.startswith("sha256:")
    assert weights_fingerprint("org/name", "main", env=env) == at_c2
    assert weights_fingerprint("org/name", c1, env=env) == at_c1          # pinned commit
    # HF_HOME is honoured when HF_HUB_CACHE is not set.
    assert weights_fingerprint("org/name", None,
                               env={"HF_HOME": str(tmp_path / "hf"), CACHE_ENV: env[CACHE_ENV]}) == at_c2
    # vLLM's --download-dir is the hub cache when given.
    assert weights_fingerprint("org/name", None, download_dir=str(hub),
                               env={CACHE_ENV: env[CACHE_ENV]}) == at_c2


def test_hub_id_missing_from_the_cache_is_a_clear_error(tmp_path):
    hub = tmp_path / "hub"
    env = {"HF_HUB_CACHE": str(hub), CACHE_ENV: str(tmp_path / "cache")}
    with pytest.raises(ModelIdentityError, match=r"'org/absent'.*connector\.model_id"):
        weights_fingerprint("org/absent", None, env=env)
    _hub_repo(hub, "org/name", "3" * 40, _shards(7))
    (hub / "models--org--name" / "refs" / "v2").write_text("4" * 40)   # ref to a missing snapshot
    with pytest.raises(ModelIdentityError, match=r"snapshot .*4{40}.* of revision 'v2'"):
        weights_fingerprint("org/name", "v2", env=env)


def test_weight_files_follow_vllms_format_preference(tmp_path):
    """A leftover pytorch_model.bin beside safetensors is not loaded, so it is not hashed."""
    model = _write_model(tmp_path / "m", {"model.safetensors": b"s" * 10,
                                          "pytorch_model.bin": b"b" * 10, "notes.txt": b"x"})
    assert [p.name for p in weight_files(model)] == ["model.safetensors"]
    (model / "model.safetensors").unlink()
    assert [p.name for p in weight_files(model)] == ["pytorch_model.bin"]
    single = tmp_path / "model-q4.gguf"
    single.write_bytes(b"g" * 10)
    assert weight_files(single) == [single]


def test_directory_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelIdentityError, match="holds no weight files"):
        weights_fingerprint(str(tmp_path / "empty"), None, env={CACHE_ENV: str(tmp_path / "c")})


WAITER = textwrap.dedent("""
    import json, sys
    from stratacache.adapters.vllm import model_identity as mi
    calls = []
    real = mi._hash_segment
    mi._hash_segment = lambda *a: calls.append(a) or real(*a)
    print("started", flush=True)
    fp = mi.weights_fingerprint(sys.argv[1], None, env={mi.CACHE_ENV: sys.argv[2]})
    print(json.dumps({"fingerprint": fp, "segments_hashed": len(calls)}), flush=True)
""")


def test_a_second_process_waits_for_the_first_and_reads_its_cache(tmp_path):
    """vLLM's scheduler and worker processes hash a model once between them."""
    model = _write_model(tmp_path / "m", _shards(8))
    cache_dir = tmp_path / "cache"
    cache = FingerprintCache(cache_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    with cache.lock(model):
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(model), str(cache_dir)],
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert waiter.stdout.readline().strip() == "started"
        ours = fingerprint_files(weight_files(model), cache, clock=LATER)
        assert waiter.poll() is None, "the second process did not wait for the lock"
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"fingerprint": "sha256:" + ours, "segments_hashed": 0}
