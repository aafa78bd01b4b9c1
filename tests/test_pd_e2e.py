"""Issue #21 end to end: disaggregated prefill between two real vLLM OpenAI servers.

A producer (``kv_role: kv_producer``) and a consumer (``kv_consumer``) run on one host and
share one shared-region file, behind ``stratacache proxy``. Client requests go through the
proxy (vLLM's two P/D hops: the prefill with ``max_tokens: 1`` and ``do_remote_decode``,
then the original request with the returned ``kv_transfer_params``). The answers, streamed
or not, must equal a single colocated server's (started first, alone, in the same execution
mode and with the same cores), and the consumer must have loaded every prompt token but the
last, rounded down to a block. Where a test must act between the hops (delete the chunks,
kill the producer) it makes the two hops itself: the decode is still answered identically
(by recompute; without the producer), and the proxy answers a 502 naming the dead producer.

One producer + consumer pair (and proxy) for the whole module; the reference server runs
before them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from stratacache.adapters.vllm.keys import artifact_key
from stratacache.config import load_config
from stratacache.engine import StorageEngine
from stratacache.models.local_llama import LlamaSpec, make_local_llama
from tests.test_vllm_api_server import ApiServer, _free_port, wait_until_healthy

pytestmark = pytest.mark.slow

CHUNK, BLOCK = 256, 128          # connector.chunk_size default; vLLM's CPU KV block size
MAX_TOKENS = 12
VOCAB = 560                      # below the local model's vocabulary (569 tokens)
REGION_CAPACITY = "256MiB"       # what ApiServer configures
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False}
# 1-4 full chunks plus a partial chunk (one block) plus a few tokens of an unfilled block.
PROMPTS = {f"chunks{c}": c * CHUNK + BLOCK + 37 for c in range(1, 5)}
PROMPTS.update(stream=2 * CHUNK + BLOCK + 5, deleted=3 * CHUNK + BLOCK + 20,
               producer_killed=CHUNK + BLOCK + 9)


def prompt_ids(name: str) -> list[int]:
    rng = random.Random(name)
    return [rng.randrange(3, VOCAB) for _ in range(PROMPTS[name])]


def loaded_tokens(name: str) -> int:
    """What the consumer loads: every prompt token but the last, rounded down to a block."""
    return (PROMPTS[name] - 1) // BLOCK * BLOCK


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_stream(url: str, body: dict, timeout: float = 300) -> tuple[str, int]:
    """The text of a streamed completion, and how many SSE events carried it."""
    req = urllib.request.Request(url, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    parts = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.headers.get("Content-Type", "").startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            parts.append(json.loads(line[len("data: "):])["choices"][0]["text"])
    return "".join(parts), len(parts)


class Proxy:
    """``stratacache proxy`` in front of one producer and one consumer (this tree's code)."""

    def __init__(self, producer: ApiServer, consumer: ApiServer, log: Path):
        self.port = _free_port()
        self._log_fh = open(log, "w")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stratacache.cli", "proxy", "--prefill", producer.url(""),
             "--decode", consumer.url(""), "--port", str(self.port), "--connect-timeout", "5"],
            stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_healthy(self) -> None:
        wait_until_healthy(self.url("/health"), self.proc, self.log, 60, what="proxy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self._log_fh.close()


@dataclass
class Pair:
    model: str
    region: Path
    producer: ApiServer
    consumer: ApiServer
    proxy: Proxy
    reference: dict          # prompt name -> the colocated server's greedy text

    def body(self, name: str) -> dict:
        return {"model": self.model, "prompt": prompt_ids(name), "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "ignore_eos": True}

    def prefill(self, name: str) -> dict:
        """Hop 1 (contract item 1): the producer's answer carries kv_transfer_params."""
        first = post(self.producer.url("/v1/completions"),
                     dict(self.body(name), max_tokens=1, stream=False,
                          kv_transfer_params=PREFILL_PARAMS))
        params = first.get("kv_transfer_params")
        assert params and params["do_remote_prefill"] is True, first
        return params

    def decode_body(self, name: str, params: dict) -> dict:
        """Hop 2 (contract item 3): the original request with the producer's parameters."""
        return dict(self.body(name), kv_transfer_params=params)


CONSUMER_COUNTERS = ("vllm:stratacache_pd_hit_tokens_total",
                     "vllm:stratacache_pd_missing_tokens_total",
                     "vllm:stratacache_pd_requests_total",
                     "vllm:stratacache_pd_rejected_params_total",
                     "vllm:stratacache_load_errors_total",
                     "vllm:external_prefix_cache_hits_total")


def counters(server: ApiServer) -> dict[str, float]:
    return {name: server.counter(name) for name in CONSUMER_COUNTERS}


def counters_after(server: ApiServer, before: dict, key: str, delta: float) -> dict:
    """The counters once ``key`` has grown by ``delta`` (vLLM publishes a step's stats with a
    later step: a one-token request makes one), or as they stand after 60 s."""
    deadline = time.time() + 60
    while True:
        now = counters(server)
        if now[key] - before[key] >= delta or time.time() > deadline:
            return {k: now[k] - before[k] for k in now}
        post(server.url("/v1/completions"), {"model": server.model, "prompt": [7], "max_tokens": 1})


def assert_loaded(server: ApiServer, name: str, before: dict) -> dict:
    """The consumer loaded the prompt of ``name``: its remote-prefill hit counter grew by
    exactly what a decode loads. Returns every counter's growth."""
    key = "vllm:stratacache_pd_hit_tokens_total"
    delta = counters_after(server, before, key, loaded_tokens(name))
    assert delta[key] == loaded_tokens(name)
    return delta


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd")
    model = str(make_local_llama(tmp / "model", LlamaSpec()))
    region = Path("/dev/shm") / f"sc-test-pd-{os.getpid()}.region"
    reference_region = Path("/dev/shm") / f"sc-test-pd-ref-{os.getpid()}.region"
    started = time.monotonic()
    reference = ApiServer(model, reference_region, tmp / "reference.log")
    try:
        reference.wait_healthy()
        texts = {name: post(reference.url("/v1/completions"),
                            {"model": model, "prompt": prompt_ids(name), "max_tokens": MAX_TOKENS,
                             "temperature": 0.0, "ignore_eos": True})["choices"][0]["text"]
                 for name in PROMPTS}
    finally:
        reference.stop()
        reference_region.unlink(missing_ok=True)
    producer = ApiServer(model, region, tmp / "producer.log", kv_role="kv_producer")
    consumer = ApiServer(model, region, tmp / "consumer.log", kv_role="kv_consumer")
    proxy = None
    try:
        producer.wait_healthy()
        consumer.wait_healthy()
        proxy = Proxy(producer, consumer, tmp / "proxy.log")
        proxy.wait_healthy()
        print(f"test_pd_e2e: servers ready after {time.monotonic() - started:.0f} s")
        yield Pair(model, region, producer, consumer, proxy, texts)
    finally:
        if proxy is not None:
            proxy.stop()
        producer.stop()
        consumer.stop()
        region.unlink(missing_ok=True)
        print(f"test_pd_e2e: module took {time.monotonic() - started:.0f} s")


@pytest.mark.parametrize("name", [n for n in PROMPTS if n.startswith("chunks")])
def test_decode_answers_as_colocated_from_loaded_kv(pair, name):
    before = counters(pair.consumer)
    text = post(pair.proxy.url("/v1/completions"), pair.body(name))
    assert text["choices"][0]["text"] == pair.reference[name]
    delta = assert_loaded(pair.consumer, name, before)
    assert delta["vllm:external_prefix_cache_hits_total"] == loaded_tokens(name)
    assert delta["vllm:stratacache_pd_requests_total"] == 1
    assert delta["vllm:stratacache_pd_missing_tokens_total"] == 0
    assert delta["vllm:stratacache_pd_rejected_params_total"] == 0
    assert delta["vllm:stratacache_load_errors_total"] == 0


def test_streamed_decode(pair):
    before = counters(pair.consumer)
    text, events = post_stream(pair.proxy.url("/v1/completions"), pair.body("stream"))
    assert text == pair.reference["stream"]
    assert events >= 2                                  # streamed, not one final message
    assert_loaded(pair.consumer, "stream", before)


def test_chunks_deleted_before_the_decode_are_recomputed(pair):
    """Another engine on the same shared region deletes the producer's chunks between the
    hops: the consumer answers identically, having computed the prompt, and counts it."""
    params = pair.prefill("deleted")
    ours = params["stratacache"]
    assert ours["num_tokens"] == loaded_tokens("deleted")
    assert len(ours["chunks"]) == 4                     # three full chunks and the partial one
    cfg = load_config(None, {"tiers.shared.path": str(pair.region),
                             "tiers.shared.capacity": REGION_CAPACITY})
    other = StorageEngine(cfg, tiers=["shared"])
    try:
        keys = [artifact_key(ours["namespace"], name) for name in ours["chunks"]]
        assert all(other.contains(k) for k in keys), "the producer's chunks were not durable"
        for key in keys:
            other.delete(key)
        assert not any(other.contains(k) for k in keys)
    finally:
        other.close()
    before = counters(pair.consumer)
    text = post(pair.consumer.url("/v1/completions"), pair.decode_body("deleted", params))
    assert text["choices"][0]["text"] == pair.reference["deleted"]
    delta = counters_after(pair.consumer, before, "vllm:stratacache_pd_missing_tokens_total",
                           loaded_tokens("deleted"))
    assert delta["vllm:stratacache_pd_missing_tokens_total"] == loaded_tokens("deleted")
    assert delta["vllm:stratacache_pd_hit_tokens_total"] == 0
    assert delta["vllm:external_prefix_cache_hits_total"] == 0


def test_a_producer_killed_between_the_hops(pair):
    """Nothing in the parameters needs the producer alive: after it dies the decode still
    answers from the shared region, and the proxy answers a new request at once with a 502
    naming the prefill backend."""
    params = pair.prefill("producer_killed")
    os.killpg(pair.producer.proc.pid, signal.SIGKILL)
    pair.producer.proc.wait(timeout=30)
    before = counters(pair.consumer)
    text = post(pair.consumer.url("/v1/completions"), pair.decode_body("producer_killed", params))
    assert text["choices"][0]["text"] == pair.reference["producer_killed"]
    assert_loaded(pair.consumer, "producer_killed", before)
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as failed:
        post(pair.proxy.url("/v1/completions"), pair.body("chunks1"), timeout=60)
    assert time.monotonic() - t0 < 30
    assert failed.value.code == 502
    error = json.loads(failed.value.read())["error"]
    assert error["hop"] == "prefill" and error["backend"] == pair.producer.url("")
    assert pair.producer.url("") in error["message"]
