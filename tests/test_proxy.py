"""The disaggregated prefill/decode proxy (stratacache/disagg/proxy.py, ``stratacache proxy``).

The proxy runs against real local aiohttp servers that play vLLM's prefill and
decode instances and record exactly what they receive: the bodies of both hops
(the contract in docs/disaggregation.md), round-robin order, SSE passed on
chunk by chunk (each chunk is sent only after the client has the previous
one, so a buffering proxy deadlocks and fails), and dead backends: refused,
killed between the hops (a real process, SIGKILL), killed mid-stream, hanging
before or during an answer, never accepting the connection. Each of those must
give a 502 (or a last SSE error event) naming the hop and the URL, within a
bounded time. The command itself runs as a subprocess: default bind address,
usage errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from stratacache.disagg.proxy import ROUTER, build_app, check_backend_url

REPO = Path(__file__).resolve().parent.parent
# Generous bound on how long any failure may take to reach the client (the timeouts
# the tests give the proxy are 0.5 s); a hang shows as this being exceeded.
BOUND_S = 15.0
REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False}
TEXT = "abc xyz ÄÖü 漢字 😀 \"quoted\" \\ back\nslash\t"


def run(coro, timeout: float = 60.0):
    """Run one test scenario in a fresh event loop, never longer than ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """A URL on which nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.asynccontextmanager
async def serving(app: web.Application):
    """``app`` on 127.0.0.1 on a free port; yields its base URL. The proxy runs as
    ``stratacache proxy`` runs it (aiohttp's default: a handler is not cancelled when its
    client goes away); a fake backend's handler is, so a hanging one ends with its client."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, handler_cancellation=ROUTER not in app, shutdown_timeout=0.5)
    await runner.setup()
    await web.SockSite(runner, sock, shutdown_timeout=0.5).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


class Backend:
    """A fake vLLM instance. Every request is recorded; ``answer(backend, request, body)``
    makes the response (default: the prefill or decode answer below)."""

    def __init__(self, name: str, log: list | None = None, answer=None, params=None):
        self.name, self.log, self.received = name, log if log is not None else [], []
        self.answer = answer or (prefill_answer if name.startswith("p") else decode_answer)
        self.params = params          # kv_transfer_params a prefill returns (None: a fresh random one)
        self.returned: list = []      # what it returned, in order (bytes or params)
        self.app = web.Application()
        for path in ("/v1/completions", "/v1/chat/completions"):
            self.app.router.add_post(path, self._generate)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/health", self._health)

    async def _generate(self, request: web.Request):
        body = await request.json()
        self.received.append({"path": request.path, "body": body, "headers": request.headers.copy()})
        self.log.append(self.name)
        return await self.answer(self, request, body)

    async def _models(self, request):
        return web.Response(body=json.dumps({"object": "list", "data": [{"id": self.name}]}).encode(),
                            content_type="application/json")

    async def _health(self, request):
        return web.Response(text="")


def random_params(rng: random.Random, name: str) -> dict:
    """kv_transfer_params as a producer might return them, with values that a careless
    re-encoding would change (unicode, floats, big ints, nesting)."""
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "stratacache": {"version": 1, "namespace": f"{name}-{rng.getrandbits(64):x}-{TEXT}",
                            "num_tokens": rng.randrange(1, 10**6),
                            "chunks": [f"{rng.getrandbits(128):032x}" for _ in range(rng.randrange(0, 6))]},
            "extra": [rng.random(), 2**70 + rng.randrange(1000), None, {"x": [True, False]}]}


async def prefill_answer(backend: Backend, request, body):
    params = backend.params if backend.params is not None else random_params(random.Random(), backend.name)
    backend.returned.append(params)
    return web.json_response({"id": f"cmpl-{backend.name}", "choices": [{"index": 0, "text": "t"}],
                              "kv_transfer_params": params})


async def decode_answer(backend: Backend, request, body):
    # Odd formatting on purpose: the client must get these exact bytes.
    raw = json.dumps({"id": f"cmpl-{backend.name}", "choices": [{"index": 0, "text": f"{TEXT}{backend.name}"}],
                      "got_params": body.get("kv_transfer_params")}, ensure_ascii=False, indent=3).encode()
    backend.returned.append(raw)
    return web.Response(body=raw, headers={"Content-Type": "application/json"})


def random_body(rng: random.Random, chat: bool) -> dict:
    """A client request with random contents and a random subset of optional fields."""
    def text():
        return "".join(rng.choice(TEXT) for _ in range(rng.randrange(1, 60)))

    body: dict = {"model": rng.choice(["m", "org/Model-7B"]), "max_tokens": rng.randrange(2, 500),
                  "temperature": rng.choice([0, 0.0, 0.7])}
    if chat:
        body["messages"] = [{"role": rng.choice(["system", "user", "assistant"]), "content": text()}
                            for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.5:
            body["max_completion_tokens"] = rng.randrange(2, 500)
    else:
        body["prompt"] = text() if rng.random() < 0.5 else [rng.randrange(50000) for _ in range(rng.randrange(1, 300))]
    optional = {"stream_options": {"include_usage": True}, "min_tokens": rng.randrange(1, 5),
                "stop": [text()], "seed": rng.randrange(2**31), "ignore_eos": rng.random() < 0.5,
                "kv_transfer_params": {"forged": "by the client"}, "n": 1, "top_p": rng.random()}
    for key, value in optional.items():
        if rng.random() < 0.5:
            body[key] = value
    return body


def expected_prefill_body(body: dict, chat: bool) -> dict:
    """The contract's first hop: one token, not streamed, the producer asked to keep the KV."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    out.update(max_tokens=1, stream=False, kv_transfer_params=REMOTE_DECODE)
    if chat:
        out["max_completion_tokens"] = 1
    return out


def expected_decode_body(body: dict, params) -> dict:
    """The contract's second hop: the client's body, the prefill's params verbatim."""
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    if params is not None:
        out["kv_transfer_params"] = params
    return out


async def post(url: str, body, headers: dict | None = None) -> tuple[int, bytes, float]:
    """POST a JSON body (or raw bytes); status, body and elapsed seconds."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S * 2)) as session:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with session.post(url, data=data,
                                headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            return resp.status, await resp.read(), time.monotonic() - t0


def assert_bad_gateway(status: int, raw: bytes, hop: str, url: str, *words: str) -> dict:
    assert status == 502, raw
    error = json.loads(raw)["error"]
    assert error["code"] == 502 and error["type"] == "BadGatewayError"
    assert error["hop"] == hop and error["backend"] == url
    assert f"{hop} backend {url}" in error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


# ------------------------------------------------------------------ the two hops
def test_the_two_hops_carry_the_contracts_exact_bodies_literal():
    """One literal example of the contract, field by field."""
    async def scenario():
        pre, dec = Backend("p0", params={"do_remote_prefill": True, "do_remote_decode": False,
                                          "stratacache": {"version": 1, "namespace": "ns", "num_tokens": 300,
                                                          "chunks": ["ab12", "cd34"]}}), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            body = {"model": "m", "prompt": "hello", "max_tokens": 7, "temperature": 0,
                    "stream_options": {"include_usage": True}}
            status, raw, _ = await post(proxy + "/v1/completions", body)
        assert status == 200
        assert pre.received[0]["body"] == {
            "model": "m", "prompt": "hello", "max_tokens": 1, "temperature": 0, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
        assert dec.received[0]["body"] == {
            "model": "m", "prompt": "hello", "max_tokens": 7, "temperature": 0,
            "stream_options": {"include_usage": True},
            "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                   "stratacache": {"version": 1, "namespace": "ns", "num_tokens": 300,
                                                   "chunks": ["ab12", "cd34"]}}}
        assert raw == dec.returned[0]
    run(scenario())


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("seed", range(8))
def test_each_request_goes_to_prefill_then_decode_with_the_returned_params(chat, seed):
    rng = random.Random(seed * 2 + chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"

    async def scenario():
        pre, dec = Backend("p0"), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            bodies = [random_body(rng, chat) for _ in range(3)]
            auth = {"Authorization": f"Bearer {rng.getrandbits(64):x}"}
            answers = [await post(proxy + path, b, headers=auth) for b in bodies]
        for i, body in enumerate(bodies):
            status, raw, _ = answers[i]
            assert status == 200
            assert raw == dec.returned[i]            # the decode's answer, byte for byte
            assert pre.received[i]["path"] == dec.received[i]["path"] == path
            assert pre.received[i]["body"] == expected_prefill_body(body, chat)
            assert dec.received[i]["body"] == expected_decode_body(body, pre.returned[i])
            # The same request id on both hops; the client's credentials forwarded.
            ids = {pre.received[i]["headers"]["X-Request-Id"], dec.received[i]["headers"]["X-Request-Id"]}
            assert len(ids) == 1 and ids != {""}
            assert pre.received[i]["headers"]["Authorization"] == auth["Authorization"]
            assert dec.received[i]["headers"]["Authorization"] == auth["Authorization"]
        assert len({pre.received[i]["headers"]["X-Request-Id"] for i in range(3)}) == 3
    run(scenario())


def test_a_client_request_id_is_kept_on_both_hops():
    async def scenario():
        pre, dec = Backend("p0"), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            status, _, _ = await post(proxy + "/v1/completions", {"prompt": "x", "max_tokens": 3},
                                      headers={"X-Request-Id": "client-id-42"})
        assert status == 200
        assert pre.received[0]["headers"]["X-Request-Id"] == dec.received[0]["headers"]["X-Request-Id"] == "client-id-42"
    run(scenario())


def test_a_prefill_without_params_still_decodes_and_warns(caplog):
    async def no_params(backend, request, body):
        return web.json_response({"id": "x", "choices": [{"text": "t"}]})

    async def scenario():
        pre, dec = Backend("p0", answer=no_params), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5,
                    "kv_transfer_params": {"do_remote_prefill": True, "forged": 1}}
            status, raw, _ = await post(proxy + "/v1/completions", body)
        assert status == 200 and raw == dec.returned[0]
        # Not the client's params either: the proxy alone sets that field.
        assert dec.received[0]["body"] == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5}
        return p, d

    with caplog.at_level(logging.WARNING, logger="stratacache.disagg.proxy"):
        p, d = run(scenario())
    warning = [r.getMessage() for r in caplog.records if "kv_transfer_params" in r.getMessage()]
    assert len(warning) == 1 and p in warning[0] and d in warning[0]


def test_an_error_answer_of_the_prefill_reaches_the_client_unchanged():
    raw_error = json.dumps({"error": {"message": f"prompt too long {TEXT}", "type": "BadRequestError",
                                      "param": None, "code": 400}}, ensure_ascii=False).encode()

    async def refuse(backend, request, body):
        return web.Response(status=400, body=raw_error, headers={"Content-Type": "application/json"})

    async def scenario():
        pre, dec = Backend("p0", answer=refuse), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            status, raw, _ = await post(proxy + "/v1/completions", {"prompt": "x" * 50, "max_tokens": 2})
        assert (status, raw) == (400, raw_error)
        assert dec.received == []
    run(scenario())


@pytest.mark.parametrize("raw, words", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                         (b"\xff\xfe", "not valid JSON")])
def test_a_bad_client_body_is_a_400_and_reaches_no_backend(raw, words):
    async def scenario():
        pre, dec = Backend("p0"), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            status, answer, _ = await post(proxy + "/v1/completions", raw)
        assert status == 400
        error = json.loads(answer)["error"]
        assert error["code"] == 400 and words in error["message"]
        assert pre.received == dec.received == []
    run(scenario())


def test_backends_are_picked_round_robin_per_hop():
    async def scenario():
        log: list = []
        pres = [Backend(f"p{i}", log) for i in range(3)]
        decs = [Backend(f"d{i}", log) for i in range(2)]
        async with contextlib.AsyncExitStack() as stack:
            p = [await stack.enter_async_context(serving(b.app)) for b in pres]
            d = [await stack.enter_async_context(serving(b.app)) for b in decs]
            proxy = await stack.enter_async_context(serving(build_app(p, d)))
            for i in range(7):
                path = "/v1/chat/completions" if i % 2 else "/v1/completions"
                status, raw, _ = await post(proxy + path, {"prompt": f"r{i}", "messages": [], "max_tokens": 2})
                assert status == 200
                # Each decode got the params of the prefill that served the same request.
                assert json.loads(raw)["got_params"] == pres[i % 3].returned[-1]
        assert log == [name for i in range(7) for name in (f"p{i % 3}", f"d{i % 2}")]
    run(scenario())


# ------------------------------------------------------------------ streaming
@pytest.mark.parametrize("seed", range(4))
def test_a_stream_is_passed_on_chunk_by_chunk(seed):
    rng = random.Random(seed)
    events = [b"data: " + json.dumps({"choices": [{"text": "".join(rng.choice(TEXT) for _ in range(rng.randrange(1, 9)))}]},
                                     ensure_ascii=False).encode() + b"\n\n" for _ in range(rng.randrange(3, 12))]
    events.append(b"data: [DONE]\n\n")
    stream = b"".join(events)
    # Random cuts: pieces need not be whole events; the proxy must not care.
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(2, min(20, len(stream) - 1))))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    gates = [asyncio.Event() for _ in pieces]

    async def streamed(backend, request, body):
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await out.prepare(request)
        for gate, piece in zip(gates, pieces):
            await gate.wait()           # set only once the client holds every earlier piece
            await out.write(piece)
        await out.write_eof()
        return out

    async def scenario():
        pre, dec = Backend("p0"), Backend("d0", answer=streamed)
        body = {"model": "m", "prompt": "hi", "max_tokens": 9, "stream": True,
                "stream_options": {"include_usage": True}}
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            async with aiohttp.ClientSession() as session:
                async with session.post(proxy + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                    got = b""
                    for i, gate in enumerate(gates):
                        gate.set()
                        want = b"".join(pieces[:i + 1])
                        while len(got) < len(want):
                            got += await asyncio.wait_for(resp.content.readany(), BOUND_S)
                        assert got == want
                    assert await asyncio.wait_for(resp.content.read(), BOUND_S) == b""
        assert pre.received[0]["body"] == expected_prefill_body(body, chat=False)
        assert dec.received[0]["body"] == expected_decode_body(body, pre.returned[0])
    run(scenario())


def test_a_client_that_leaves_mid_stream_aborts_the_decode_request():
    aborted = asyncio.Event()

    async def endless(backend, request, body):
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        try:
            for i in range(2000):
                await out.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            aborted.set()
            raise
        return out

    async def scenario():
        pre, dec = Backend("p0"), Backend("d0", answer=endless)
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            session = aiohttp.ClientSession()
            resp = await session.post(proxy + "/v1/completions", json={"prompt": "x", "stream": True})
            assert (await asyncio.wait_for(resp.content.readany(), BOUND_S)).startswith(b"data: 0")
            resp.close()
            await session.close()
            await asyncio.wait_for(aborted.wait(), BOUND_S)
    run(scenario())


def test_a_client_that_closes_on_done_before_the_stream_ends_is_no_error(caplog):
    """Clients (vLLM's own benchmark client among them) close on ``data: [DONE]``, before
    the chunked body's end: the proxy must take that quietly."""
    finish = asyncio.Event()

    async def done_then_wait(backend, request, body):
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b"data: {}\n\ndata: [DONE]\n\n")
        await finish.wait()             # set once the proxy has seen the client go
        await out.write_eof()
        return out

    async def scenario():
        pre, dec = Backend("p0"), Backend("d0", answer=done_then_wait)
        seen, handled = [], asyncio.Event()

        @web.middleware
        async def watch(request, handler):
            seen.append(request)
            try:
                return await handler(request)
            finally:
                handled.set()

        async with serving(pre.app) as p, serving(dec.app) as d:
            app = build_app([p], [d])
            app.middlewares.append(watch)
            async with serving(app) as proxy:
                session = aiohttp.ClientSession()
                resp = await session.post(proxy + "/v1/completions", json={"prompt": "x", "stream": True})
                got = b""
                while b"[DONE]" not in got:
                    got += await asyncio.wait_for(resp.content.readany(), BOUND_S)
                resp.close()
                await session.close()
                deadline = time.monotonic() + BOUND_S
                while seen[0].transport is not None:     # until the proxy has seen the close
                    assert time.monotonic() < deadline, "the proxy never saw the client close"
                    await asyncio.sleep(0.01)
                finish.set()
                await asyncio.wait_for(handled.wait(), BOUND_S)
                await asyncio.sleep(0)                   # let aiohttp log what the handler raised

    with caplog.at_level(logging.DEBUG):
        run(scenario())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ------------------------------------------------------------------ dead backends
def test_a_refused_prefill_is_a_502_naming_it_and_decode_is_not_asked():
    async def scenario():
        dead, dec = closed_port_url(), Backend("d0")
        async with serving(dec.app) as d, serving(build_app([dead], [d])) as proxy:
            status, raw, elapsed = await post(proxy + "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert_bad_gateway(status, raw, "prefill", dead, "unreachable")
        assert elapsed < BOUND_S and dec.received == []
    run(scenario())


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_decode_is_a_502_naming_it(stream):
    async def scenario():
        pre, dead = Backend("p0"), closed_port_url()
        async with serving(pre.app) as p, serving(build_app([p], [dead])) as proxy:
            status, raw, elapsed = await post(proxy + "/v1/chat/completions",
                                              {"messages": [], "max_tokens": 2, "stream": stream})
        assert_bad_gateway(status, raw, "decode", dead, "unreachable")
        assert elapsed < BOUND_S and len(pre.received) == 1
    run(scenario())


# A backend in its own process, so that it can really be killed. Modes: "answer"
# (a prefill answer), "die-mid-stream" (two SSE events, then the process exits).
BACKEND_PROCESS = r"""
import json, os, socket, sys
from aiohttp import web
mode = sys.argv[1]
async def generate(request):
    await request.json()
    if mode == "die-mid-stream":
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(2):
            await out.write(("data: " + json.dumps({"i": i}) + "\n\n").encode())
        os._exit(0)
    return web.json_response({"choices": [{"text": "alive"}],
                              "kv_transfer_params": {"from": "process"}})
app = web.Application()
app.router.add_post("/v1/completions", generate)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(128)                 # before the port is told: connections queue until run_app serves
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, print=None)
"""


@contextlib.contextmanager
def backend_process(mode: str):
    """A fake backend in a child process; yields (url, process); always reaped."""
    proc = subprocess.Popen([sys.executable, "-c", BACKEND_PROCESS, mode], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_decode_killed_between_the_hops_is_a_502_naming_it():
    with backend_process("answer") as (dead_url, proc):
        async def kill_then_answer(backend, request, body):
            if backend.received[-1]["body"]["prompt"] == "kill":
                os.kill(proc.pid, signal.SIGKILL)
                await asyncio.get_running_loop().run_in_executor(None, proc.wait)
            return await prefill_answer(backend, request, body)

        async def scenario():
            pre = Backend("p0", answer=kill_then_answer)
            async with serving(pre.app) as p, serving(build_app([p], [dead_url])) as proxy:
                alive = await post(proxy + "/v1/completions", {"prompt": "first", "max_tokens": 2})
                assert alive[0] == 200 and json.loads(alive[1])["choices"][0]["text"] == "alive"
                status, raw, elapsed = await post(proxy + "/v1/completions", {"prompt": "kill", "max_tokens": 2})
            assert proc.returncode == -signal.SIGKILL
            assert_bad_gateway(status, raw, "decode", dead_url)
            assert elapsed < BOUND_S
        run(scenario())


def test_a_prefill_killed_after_answering_leaves_that_decode_alone_and_the_next_request_gets_a_502():
    """The KV is in the tiers once the prefill answered: its death between the hops does not
    touch that request; the next request to it is a 502 naming it, at once."""
    with backend_process("answer") as (prefill_url, proc):
        async def kill_prefill_then_answer(backend, request, body):
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)
            return await decode_answer(backend, request, body)

        async def scenario():
            dec = Backend("d0", answer=kill_prefill_then_answer)
            async with serving(dec.app) as d, serving(build_app([prefill_url], [d])) as proxy:
                status, raw, _ = await post(proxy + "/v1/completions", {"prompt": "x", "max_tokens": 3})
                assert status == 200 and raw == dec.returned[0]
                assert dec.received[0]["body"]["kv_transfer_params"] == {"from": "process"}
                assert proc.returncode == -signal.SIGKILL
                status, raw, elapsed = await post(proxy + "/v1/completions", {"prompt": "y", "max_tokens": 3})
            assert_bad_gateway(status, raw, "prefill", prefill_url)
            assert elapsed < BOUND_S and len(dec.received) == 1
        run(scenario())


def test_a_decode_that_dies_mid_stream_ends_the_stream_with_an_error_event():
    with backend_process("die-mid-stream") as (url, proc):
        async def scenario():
            pre = Backend("p0")
            async with serving(pre.app) as p, serving(build_app([p], [url])) as proxy:
                status, raw, elapsed = await post(proxy + "/v1/completions",
                                                  {"prompt": "x", "max_tokens": 9, "stream": True})
            assert status == 200 and elapsed < BOUND_S
            events = [e for e in raw.split(b"\n\n") if e]
            assert events[:2] == [b'data: {"i": 0}', b'data: {"i": 1}']
            assert len(events) == 3 and b"[DONE]" not in raw
            error = json.loads(events[2][len(b"data: "):])["error"]
            assert error["code"] == 502 and error["hop"] == "decode" and error["backend"] == url
            assert "mid-stream" in error["message"] and url in error["message"]
        run(scenario())
        assert proc.wait(timeout=30) == 0


async def _hang(backend, request, body):
    await asyncio.Event().wait()


@pytest.mark.parametrize("hop", ["prefill", "decode"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_that_hangs_before_answering_is_a_502_after_the_read_timeout(hop, stream):
    async def scenario():
        pre = Backend("p0", answer=_hang if hop == "prefill" else None)
        dec = Backend("d0", answer=_hang if hop == "decode" else None)
        async with serving(pre.app) as p, serving(dec.app) as d, \
                serving(build_app([p], [d], read_timeout_s=0.5)) as proxy:
            status, raw, elapsed = await post(proxy + "/v1/completions",
                                              {"prompt": "x", "max_tokens": 2, "stream": stream})
        assert_bad_gateway(status, raw, hop, p if hop == "prefill" else d, "read timeout", "0.5 s")
        assert 0.4 < elapsed < BOUND_S
        assert len(pre.received) == 1 and len(dec.received) == (hop == "decode")
    run(scenario())


def test_a_decode_that_hangs_mid_stream_ends_the_stream_after_the_read_timeout():
    async def one_then_hang(backend, request, body):
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b"data: {\"first\": true}\n\n")
        await asyncio.Event().wait()

    async def scenario():
        pre, dec = Backend("p0"), Backend("d0", answer=one_then_hang)
        async with serving(pre.app) as p, serving(dec.app) as d, \
                serving(build_app([p], [d], read_timeout_s=0.5)) as proxy:
            status, raw, elapsed = await post(proxy + "/v1/completions", {"prompt": "x", "stream": True})
        assert status == 200 and 0.4 < elapsed < BOUND_S
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[0] == b'data: {"first": true}' and len(events) == 2
        error = json.loads(events[1][len(b"data: "):])["error"]
        assert error["hop"] == "decode" and error["backend"] == d
        assert "read timeout" in error["message"] and "mid-stream" in error["message"]
    run(scenario())


def test_a_backend_that_never_accepts_the_connection_is_a_502_after_the_connect_timeout():
    # A listening socket whose accept queue (length 1 with backlog 0) is full: the kernel
    # drops further SYNs, so a connect hangs exactly as to a host that has gone away.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    filler = socket.create_connection(listener.getsockname(), timeout=5)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        with pytest.raises(TimeoutError):
            probe.connect(listener.getsockname())   # the set-up really blocks new connections

        async def scenario():
            dec = Backend("d0")
            async with serving(dec.app) as d, serving(build_app([url], [d], connect_timeout_s=0.5)) as proxy:
                status, raw, elapsed = await post(proxy + "/v1/completions", {"prompt": "x"})
            assert_bad_gateway(status, raw, "prefill", url, "connect timeout", "0.5 s")
            assert 0.4 < elapsed < BOUND_S and dec.received == []
        run(scenario())
    finally:
        for s in (probe, filler, listener):
            s.close()


def test_a_prefill_answer_that_is_not_json_is_a_502():
    async def garbage(backend, request, body):
        return web.Response(text="<html>gateway</html>", content_type="text/html")

    async def scenario():
        pre, dec = Backend("p0", answer=garbage), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d, serving(build_app([p], [d])) as proxy:
            status, raw, _ = await post(proxy + "/v1/completions", {"prompt": "x"})
        assert_bad_gateway(status, raw, "prefill", p, "not JSON")
        assert dec.received == []
    run(scenario())


# ------------------------------------------------------------------ /health, /v1/models
def test_health_checks_every_backend_and_names_a_dead_one():
    async def scenario():
        pre, dec = Backend("p0"), Backend("d0")
        dead = closed_port_url()
        async with serving(pre.app) as p, serving(dec.app) as d:
            async with serving(build_app([p], [d])) as proxy, aiohttp.ClientSession() as s:
                async with s.get(proxy + "/health") as r:
                    assert r.status == 200
                    assert await r.json() == {"status": "ok", "backends": [
                        {"hop": "prefill", "backend": p, "status": "ok"},
                        {"hop": "decode", "backend": d, "status": "ok"}]}
            async with serving(build_app([p], [d, dead])) as proxy, aiohttp.ClientSession() as s:
                t0 = time.monotonic()
                async with s.get(proxy + "/health") as r:
                    assert r.status == 503
                    report = await r.json()
                assert time.monotonic() - t0 < BOUND_S
        assert report["status"] == "unavailable"
        bad = [b for b in report["backends"] if b["status"] != "ok"]
        assert len(bad) == 1 and bad[0]["hop"] == "decode" and bad[0]["backend"] == dead
        assert "unreachable" in bad[0]["error"]
    run(scenario())


def test_models_are_answered_by_the_decode_side():
    async def scenario():
        pre, decs = Backend("p0"), [Backend("d0"), Backend("d1")]
        async with serving(pre.app) as p, serving(decs[0].app) as d0, serving(decs[1].app) as d1:
            dead = closed_port_url()
            async with serving(build_app([p], [d0, d1, dead])) as proxy, aiohttp.ClientSession() as s:
                names = []
                for _ in range(3):
                    async with s.get(proxy + "/v1/models") as r:
                        if r.status == 200:
                            names.append((await r.json())["data"][0]["id"])
                        else:
                            assert_bad_gateway(r.status, await r.read(), "decode", dead)
        assert names == ["d0", "d1"]
    run(scenario())


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("url, words", [
    ("ftp://h:1", "must look like http://HOST:PORT"), ("localhost:8000", "must look like"),
    ("http://h:port", "not valid"), ("http://h:1/v1", "no path"), ("http://[::1", "not valid"),
    ("http://h:1?x=1", "no path, query"), ("", "must look like")])
def test_a_bad_backend_url_is_refused_naming_it(url, words):
    with pytest.raises(ValueError) as err:
        build_app(["http://127.0.0.1:1"], [url])
    assert repr(url) in str(err.value) and "decode" in str(err.value) and words in str(err.value)


def test_good_backend_urls_are_normalised():
    assert check_backend_url("http://127.0.0.1:8001/") == "http://127.0.0.1:8001"
    assert check_backend_url("https://[::1]:9") == "https://[::1]:9"
    assert check_backend_url("http://host") == "http://host"


@pytest.mark.parametrize("kwargs, words", [
    ({"prefill_urls": []}, "at least one prefill"), ({"decode_urls": "http://h:1"}, "decode backend URL (a list)"),
    ({"connect_timeout_s": 0}, "connect_timeout_s"), ({"read_timeout_s": -1}, "read_timeout_s"),
    ({"read_timeout_s": True}, "read_timeout_s"), ({"connect_timeout_s": "5"}, "connect_timeout_s")])
def test_bad_build_app_arguments_are_refused_naming_them(kwargs, words):
    args = {"prefill_urls": ["http://h:1"], "decode_urls": ["http://h:2"], **kwargs}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        build_app(**args)


# ------------------------------------------------------------------ the command
def cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stratacache.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("argv, words", [
    (["proxy", "--prefill", "http://127.0.0.1:1"], ["--decode"]),
    (["proxy", "--decode", "http://127.0.0.1:1"], ["--prefill"]),
    (["proxy", "--prefill", "--decode", "http://127.0.0.1:1"], ["--prefill"]),
    (["proxy", "--prefill", "ftp://x", "--decode", "http://127.0.0.1:1"], ["prefill backend URL", "ftp://x"]),
    (["proxy", "--prefill", "http://127.0.0.1:1", "--decode", "http://h:1/v1"], ["decode backend URL", "no path"]),
    (["proxy", "--prefill", "http://a:1", "--decode", "http://b:1", "--port", "70000"], ["--port", "70000"]),
    (["proxy", "--prefill", "http://a:1", "--decode", "http://b:1", "--read-timeout", "0"], ["--read-timeout"]),
    (["proxy", "--prefill", "http://a:1", "--decode", "http://b:1", "--connect-timeout", "x"],
     ["--connect-timeout", "'x'"]),
])
def test_bad_command_lines_are_one_line_errors(argv, words):
    result = cli(*argv)
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stratacache: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_port_in_use_is_a_one_line_error_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli("proxy", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2",
                     "--port", str(port))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_the_command_listens_on_loopback_by_default_and_routes():
    port = free_port()

    async def scenario():
        pre, dec = Backend("p0"), Backend("d0")
        async with serving(pre.app) as p, serving(dec.app) as d:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stratacache.cli", "proxy", "--prefill", p, "--decode", d,
                "--port", str(port), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
                assert f"listening on http://127.0.0.1:{port}" in line, line
                # Only the IPv4 loopback address, nothing on 0.0.0.0 or ::.
                assert _listening_addresses(port) == ["0100007F"]
                status, raw, _ = await post(f"http://127.0.0.1:{port}/v1/completions",
                                            {"prompt": "via the command", "max_tokens": 4})
                assert status == 200 and raw == dec.returned[0]
                assert pre.received[0]["body"]["max_tokens"] == 1
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 30) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    run(scenario())
