"""Acceptance 6: vLLM's OpenAI server reuses KV that a previous server process persisted.

Two ``python -m vllm.entrypoints.openai.api_server`` processes run one after
the other on 127.0.0.1 with the connector and the same shared-region file.
The second answers the same completion with identical text while its
Prometheus endpoint shows the StrataCache hit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stratacache.adapters.vllm import kv_transfer_config
from stratacache.models.local_llama import LlamaSpec, make_local_llama, sample_text

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float,
                       what: str = "server") -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``proc`` exits or time
    runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited rc={proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{what} not healthy in {timeout_s}s:\n{log.read_text()[-5000:]}")


class ApiServer:
    def __init__(self, model: str, region: Path, log: Path, kv_role: str = "kv_both"):
        self.port = _free_port()
        self.model = model
        conf = kv_transfer_config(kv_role=kv_role, **{"tiers.shared.path": str(region),
                                                      "tiers.shared.capacity": "256MiB",
                                                      "tiers.cpu.capacity": "128MiB"})
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
               "--enforce-eager", "--max-model-len", "2048", "--seed", "0",
               "--kv-transfer-config", json.dumps(conf)]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="1")
        self.log = log
        self._log_fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_healthy(self) -> None:
        wait_until_healthy(self.url("/health"), self.proc, self.log, START_TIMEOUT_S)

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": 16,
                           "temperature": 0.0, "ignore_eos": True}).encode()
        req = urllib.request.Request(self.url("/v1/completions"), data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["text"]

    def counter(self, name: str) -> float:
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as r:
            text = r.read().decode()
        values = [float(m.group(1)) for m in
                  re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)]
        return sum(values)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log_fh.close()


def test_second_server_process_reuses_persisted_kv(tmp_path):
    model = str(make_local_llama(tmp_path / "model", LlamaSpec()))
    region = Path("/dev/shm") / f"sc-test-vllm-api-{os.getpid()}.region"
    prompt = sample_text(600, seed=42)
    try:
        first = ApiServer(model, region, tmp_path / "server1.log")
        try:
            first.wait_healthy()
            text1 = first.complete(prompt)
            # Stores complete off the step loop: wait until they are acknowledged.
            deadline = time.time() + 30
            while first.counter("vllm:stratacache_save_chunks_total") < 1 and time.time() < deadline:
                first.complete("x")   # a tiny request makes the engine report its stats
                time.sleep(0.5)
            assert first.counter("vllm:stratacache_save_chunks_total") >= 1
            assert first.counter("vllm:stratacache_hit_tokens_total") == 0
        finally:
            first.stop()
        second = ApiServer(model, region, tmp_path / "server2.log")
        try:
            second.wait_healthy()
            text2 = second.complete(prompt)
            assert text2 == text1
            assert second.counter("vllm:stratacache_hit_tokens_total") >= 256
            assert second.counter("vllm:stratacache_load_errors_total") == 0
        finally:
            second.stop()
    finally:
        region.unlink(missing_ok=True)
