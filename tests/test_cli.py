"""The ``stratacache`` command driven as a user drives it: in a subprocess.

Covers usage errors (one line, non-zero, no traceback), ``--debug``,
``config check`` / ``config show`` (JSON parsed and checked against the
schema), ``serve`` (the command it builds, and a real server answering), and
``bench`` on the real ops benchmark.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def cli(*args, timeout=120, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m stratacache.cli ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "stratacache.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=dict(os.environ, **(env or {})))


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("stratacache: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def write_yaml(path: Path, document) -> Path:
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


# ------------------------------------------------------------------ usage errors

def _usage_cases(tmp: Path) -> list[tuple[list, tuple[str, ...], int | None]]:
    """(argv, words the one-line error must contain, exact exit status or None)."""
    bad_key = write_yaml(tmp / "bad_key.yaml", {"tiers": {"cpu": {"capasity": "1GiB"}}})
    bad_size = write_yaml(tmp / "bad_size.yaml", {"tiers": {"disk": {"capacity": "-3GiB"}}})
    bad_yaml = write_yaml(tmp / "bad.yaml", "tiers: [unclosed\n")
    bad_type = write_yaml(tmp / "bad_type.yaml", {"connector": {"chunk_size": "lots"}})
    model = tmp / "not-a-model"
    model.mkdir()
    return [
        ([], ("COMMAND",), 2),
        (["frobnicate"], ("frobnicate",), 2),
        (["bench", "gpu-everything"], ("gpu-everything",), 2),
        (["bench", "ops", "--out", "/proc/no-such-dir/out"], ("--out", "/proc/no-such-dir/out"), 1),
        (["demo", "--docs", "x"], ("--docs", "'x'"), 2),
        (["demo", "--docs", "2"], ("--docs", "at least 3"), 2),
        (["demo", "--max-tokens", "0"], ("--max-tokens",), 2),
        (["demo", "--workdir", "/proc/no-such-dir/demo"], ("--workdir",), 1),
        (["config"], ("ACTION",), 2),
        (["config", "check"], ("FILE",), 2),
        (["config", "check", tmp / "missing.yaml"], ("not found", "missing.yaml"), 1),
        (["config", "check", tmp], ("directory",), 1),
        (["config", "check", bad_key], ("tiers.cpu.capasity", "did you mean tiers.cpu.capacity"), 1),
        (["config", "check", bad_size], ("tiers.disk.capacity", "-3GiB"), 1),
        (["config", "check", bad_yaml], ("not valid YAML", "bad.yaml"), 1),
        (["config", "check", bad_type], ("connector.chunk_size", "lots"), 1),
        (["inspect", "--config", tmp / "missing.yaml"], ("not found", "missing.yaml"), 1),
        (["inspect", "--config", bad_key], ("tiers.cpu.capasity",), 1),
        (["inspect", "--tier", "floppy"], ("floppy",), 2),
        (["serve", tmp / "no-such-model"], ("model directory not found", "no-such-model"), 1),
        (["serve", model], ("config.json", "not-a-model"), 1),
        (["serve", "--config", tmp / "missing.yaml", "org/model"], ("not found", "missing.yaml"), 1),
        (["serve", "--config", bad_key, "org/model"], ("tiers.cpu.capasity",), 1),
        (["serve", "org/model", "--kv-transfer-config", "{}"], ("--kv-transfer-config",), 2),
        (["serve", "org/model", "--model", "x"], ("MODEL",), 2),
        (["serve", "--kv-role", "producer", "org/model"], ("--kv-role", "'producer'", "kv_producer"), 2),
        (["config", "show", "--no-such-flag"], ("--no-such-flag",), 2),
    ]


def test_wrong_usage_gives_one_line_error_and_nonzero_exit(tmp_path):
    cases = _usage_cases(tmp_path)
    assert len(cases) >= 10
    failures = []
    for argv, needles, status in cases:
        result = cli(*argv)
        try:
            assert_one_line_error(result, *needles)
            assert status is None or result.returncode == status, f"exit {result.returncode}"
        except AssertionError as exc:
            failures.append(f"{[str(a) for a in argv]}: {exc}")
    assert not failures, "\n".join(failures)


def test_debug_flag_shows_the_traceback(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"tiers": {"cpu": {"capacity": "lots"}}})
    plain = cli("config", "check", bad)
    assert_one_line_error(plain, "tiers.cpu.capacity")
    debug = cli("--debug", "config", "check", bad)
    assert debug.returncode == plain.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == plain.stderr.strip()


def test_console_script_and_module_entry_points_agree():
    script = Path(sys.executable).with_name("stratacache")
    assert script.exists(), "the 'stratacache' console script is not installed in this venv"
    via_script = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                timeout=60)
    via_module = cli("--version")
    assert via_script.returncode == via_module.returncode == 0
    assert via_script.stdout == via_module.stdout
    from stratacache import __version__
    assert via_module.stdout.strip() == f"stratacache {__version__}"


# ------------------------------------------------------------------ config

def test_config_show_lists_every_schema_key_with_its_default():
    from stratacache.config import describe_config

    result = cli("config", "show", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    expected = describe_config()
    assert [row["key"] for row in shown] == [row[0] for row in expected]
    for row, (key, type_name, default, doc) in zip(shown, expected):
        assert (row["type"], row["default"], row["doc"]) == (type_name, default, doc), key
        assert row["doc"], f"{key} has no documentation"
    by_key = {row["key"]: row for row in shown}
    assert by_key["tiers.cpu.capacity"]["default"] == "2GiB"
    text = cli("config", "show")
    assert text.returncode == 0
    for key, *_ in expected:
        assert key in text.stdout


def test_config_check_prints_the_effective_merged_config(tmp_path):
    from stratacache.config import load_config

    rng = random.Random(8)
    mib = rng.randrange(64, 1024)
    chunk = 128 * rng.randrange(1, 8)
    path = write_yaml(tmp_path / "mine.yaml", {
        "tiers": {"cpu": {"capacity": f"{mib}MiB"},
                  "disk": {"enabled": True, "path": str(tmp_path / "disk")}},
        "connector": {"chunk_size": chunk}})
    result = cli("config", "check", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True and report["file"] == str(path)
    effective = report["config"]
    assert effective["tiers"]["cpu"]["capacity"] == mib << 20
    assert effective["tiers"]["disk"]["enabled"] is True
    assert effective["connector"]["chunk_size"] == chunk
    # Everything not in the file is the packaged default.
    defaults = load_config().to_dict()
    assert effective["tiers"]["shared"] == defaults["tiers"]["shared"]
    assert effective["namespaces"] == defaults["namespaces"]
    # The text form is the same config as YAML.
    text = cli("config", "check", path)
    assert text.returncode == 0
    assert yaml.safe_load(text.stdout) == effective


def test_config_check_accepts_the_repository_config_and_legacy_keys(tmp_path):
    assert cli("config", "check", REPO / "config.yaml").returncode == 0
    legacy = write_yaml(tmp_path / "legacy.yaml", {"cpu_capacity_mb": 300, "bundle_layers": True})
    result = cli("config", "check", legacy, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"]["tiers"]["cpu"]["capacity"] == 300 << 20
    assert any("bundle_layers" in note for note in report["deprecations"])


# ------------------------------------------------------------------ serve

def test_serve_dry_run_builds_the_vllm_server_command(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"connector": {"chunk_size": 512}})
    result = cli("serve", "--config", config, "--dry-run", "org/some-model", "--port", "8123",
                 "--max-model-len", "1024")
    assert result.returncode == 0, result.stderr
    import shlex
    argv = shlex.split(result.stdout.strip())
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == "org/some-model"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[-4:] == ["--port", "8123", "--max-model-len", "1024"]
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "StrataCacheConnectorV1"
    assert transfer["kv_connector_module_path"] == "stratacache.adapters.vllm.connector_v1"
    assert transfer["kv_connector_extra_config"]["stratacache.config_path"] == str(config)
    # A host given by the user wins; no second --host is added.
    public = cli("serve", "--dry-run", "org/some-model", "--host=0.0.0.0")
    argv = shlex.split(public.stdout.strip())
    assert [a for a in argv if a.startswith("--host")] == ["--host=0.0.0.0"]


@pytest.mark.parametrize("role", ["kv_producer", "kv_consumer", "kv_both"])
def test_serve_kv_role_sets_the_connectors_role(tmp_path, role):
    import shlex
    result = cli("serve", "--kv-role", role, "--dry-run", "org/some-model", "--port", "8123")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip())
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer["kv_role"] == role
    assert transfer["kv_connector"] == "StrataCacheConnectorV1"
    assert argv[-2:] == ["--port", "8123"]
    # Without the option the connector keeps its default role.
    default = cli("serve", "--dry-run", "org/some-model")
    argv = shlex.split(default.stdout.strip())
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_role"] == "kv_both"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_starts_a_local_server_that_answers(tmp_path):
    from stratacache.models import make_local_llama, sample_text

    model = make_local_llama(tmp_path / "model")
    port = _free_port()
    config = write_yaml(tmp_path / "c.yaml", {"tiers": {"shared": {
        "path": f"/dev/shm/stratacache-cli-test-{os.getpid()}.region", "capacity": "64MiB"}}})
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "stratacache.cli", "serve", "--config", str(config), str(model),
         "--port", str(port), "--max-model-len", "1024", "--dtype", "bfloat16", "--enforce-eager"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="1"))
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server not healthy in 240 s"
            time.sleep(1)
        # It listens on loopback only.
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                   text=True).stdout
        assert f"127.0.0.1:{port} " in listening, listening
        assert f"0.0.0.0:{port} " not in listening and f"*:{port} " not in listening, listening
        body = json.dumps({"model": str(model), "prompt": sample_text(300, seed=5),
                           "max_tokens": 8, "temperature": 0}).encode()
        texts = []
        for _ in range(2):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                texts.append(json.loads(r.read())["choices"][0]["text"])
        assert texts[0] == texts[1] and texts[0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        Path(f"/dev/shm/stratacache-cli-test-{os.getpid()}.region").unlink(missing_ok=True)


# ------------------------------------------------------------------ bench

@pytest.mark.slow
def test_bench_runs_a_benchmark_and_writes_json_and_chart(tmp_path):
    result = cli("bench", "ops", "--quick", "--out", tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads((tmp_path / "ops.json").read_text())
    assert isinstance(document["device"], str) and isinstance(document["summary"], dict)
    # The printed summary table holds every numeric summary entry.
    numeric = {k: v for k, v in document["summary"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric, document["summary"]
    for key in numeric:
        assert key in result.stdout
    assert (tmp_path / "ops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"JSON: {tmp_path / 'ops.json'}" in result.stdout
