"""An OpenAI-compatible router for disaggregated prefill and decode (vLLM's P/D protocol).

Each ``/v1/completions`` or ``/v1/chat/completions`` request goes twice:

1. to a prefill instance (kv_role ``kv_producer``) with ``max_tokens: 1``, no
   streaming and ``kv_transfer_params: {"do_remote_decode": true, ...}``: it
   computes the prompt's KV, stores it in the tiers and answers with the
   ``kv_transfer_params`` that name what it stored;
2. to a decode instance (``kv_consumer``) with the client's own body plus those
   params, verbatim: it loads the KV instead of computing the prompt, and its
   answer (streamed or not) goes back to the client unchanged.

Backends are picked round-robin, one list per hop. A backend that refuses the
connection, does not accept it within the connect timeout, sends nothing for
the read timeout, or closes the connection mid-answer is answered with HTTP
502 and a JSON error naming the hop and the backend's URL; once a stream has
started, the same error arrives as a last SSE event instead (the status line
is already sent), without ``[DONE]``. There is no fail-over: the client decides
whether to retry. An error answer of a backend (a 400 for a bad request, say)
reaches the client as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from stratacache.disagg import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 64 << 20         # long prompts given as token ids exceed aiohttp's 1 MiB default
PREFILL_HOP, DECODE_HOP = "prefill", "decode"
REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False}
FORWARDED_HEADERS = ("Authorization",)
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


def check_backend_url(url: str, hop: str = "") -> str:
    """``url`` as ``scheme://host[:port]``, or a ValueError that names it (and the hop).

    The proxy appends the OpenAI paths itself, so a path (``/v1``) is refused
    rather than silently doubled.
    """
    what = f"{hop} backend URL {url!r}".lstrip()
    try:
        parts = urlsplit(url)
        parts.port   # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError(f"{what} is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must look like http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{what} must have no path, query or fragment: give "
                         f"{parts.scheme}://{parts.netloc} (the proxy adds /v1/...)")
    return f"{parts.scheme}://{parts.netloc}"


class BackendError(Exception):
    """A backend could not be reached or broke off its answer; the client gets a 502 naming it."""

    def __init__(self, hop: str, url: str, reason: str):
        super().__init__(f"{hop} backend {url} {reason}")
        self.hop, self.url = hop, url

    def body(self) -> dict:
        """An OpenAI-style error object, plus the hop and the backend."""
        return {"error": {"message": str(self), "type": "BadGatewayError", "param": None,
                          "code": 502, "hop": self.hop, "backend": self.url}}


class RoundRobin:
    """The backends of one hop, handed out in turn (the event loop is single-threaded)."""

    def __init__(self, hop: str, urls: Sequence[str]):
        if isinstance(urls, str) or not urls:
            raise ValueError(f"give at least one {hop} backend URL (a list)")
        self.hop = hop
        self.urls = tuple(check_backend_url(u, hop) for u in urls)
        self._turn = 0

    def pick(self) -> str:
        url = self.urls[self._turn % len(self.urls)]
        self._turn += 1
        return url


class Router:
    """What the handlers share: the two hops' backends, the timeouts, one client session."""

    def __init__(self, prefill: RoundRobin, decode: RoundRobin, connect_timeout_s: float,
                 read_timeout_s: float):
        self.prefill, self.decode = prefill, decode
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.session: aiohttp.ClientSession | None = None

    def reason(self, exc: BaseException) -> str:
        """What went wrong with a backend, in words a user can act on."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"did not accept the connection within {self.connect_timeout_s:g} s (connect timeout)"
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return f"sent nothing for {self.read_timeout_s:g} s (read timeout)"
        if isinstance(exc, asyncio.TimeoutError):
            return "timed out"
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"is unreachable: {exc.os_error.strerror or exc.os_error}"
        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
            return "closed the connection before its answer was complete"
        return f"failed: {type(exc).__name__}: {exc}"


ROUTER = web.AppKey("router", Router)


def build_app(prefill_urls: Sequence[str], decode_urls: Sequence[str], *,
              connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
              read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> web.Application:
    """The proxy as an aiohttp application (run it with ``web.run_app`` or an ``AppRunner``).

    ``connect_timeout_s`` bounds opening a connection to a backend,
    ``read_timeout_s`` any silence of a backend that has the request. Bad
    arguments raise ValueError naming them.
    """
    for name, value in (("connect_timeout_s", connect_timeout_s), ("read_timeout_s", read_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")
    router = Router(RoundRobin(PREFILL_HOP, prefill_urls), RoundRobin(DECODE_HOP, decode_urls),
                    float(connect_timeout_s), float(read_timeout_s))
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[ROUTER] = router
    app.cleanup_ctx.append(_client_session)
    for path in GENERATE_PATHS:
        app.router.add_post(path, _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    return app


async def _client_session(app: web.Application):
    router = app[ROUTER]
    # sock_connect, not connect: the latter also counts waiting for a pooled connection.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=router.connect_timeout_s,
                                    sock_read=router.read_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        router.session = session
        yield
    router.session = None


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


def prefill_body(body: dict, chat: bool) -> dict:
    """The first hop's request: compute the prompt and one token, store the KV for a decoder."""
    out = dict(body, max_tokens=1, stream=False, kv_transfer_params=dict(REMOTE_DECODE))
    if chat:
        out["max_completion_tokens"] = 1
    out.pop("stream_options", None)
    # vLLM refuses min_tokens above max_tokens; the decode hop keeps the client's.
    out.pop("min_tokens", None)
    return out


def decode_body(body: dict, prefill_answer) -> dict:
    """The second hop's request: the client's body with the prefill's kv_transfer_params."""
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    params = prefill_answer.get("kv_transfer_params") if isinstance(prefill_answer, dict) else None
    if params is not None:
        out["kv_transfer_params"] = params
    return out


async def _generate(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    try:
        body = await request.json()
    except ValueError as exc:
        return _error(400, "BadRequestError", f"the request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "BadRequestError", "the request body must be a JSON object")
    headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
    # One id on both hops, so the two instances' logs can be matched.
    headers["X-Request-Id"] = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    prefill_url, decode_url = router.prefill.pick(), router.decode.pick()
    try:
        status, content_type, raw = await _fetch(router, PREFILL_HOP, prefill_url, request.path,
                                                 prefill_body(body, request.path.endswith("/chat/completions")),
                                                 headers)
        if status != 200:
            return web.Response(status=status, body=raw, headers={"Content-Type": content_type})
        try:
            answer = json.loads(raw)
        except ValueError:
            raise BackendError(PREFILL_HOP, prefill_url, "answered with a body that is not JSON") from None
        if not isinstance(answer, dict) or answer.get("kv_transfer_params") is None:
            log.warning("prefill backend %s returned no kv_transfer_params (request %s): the decode "
                        "backend %s computes the prompt itself", prefill_url, headers["X-Request-Id"],
                        decode_url)
        return await _relay(request, router, DECODE_HOP, decode_url, "POST", decode_body(body, answer),
                            headers)
    except BackendError as exc:
        log.warning("%s (request %s)", exc, headers["X-Request-Id"])
        return web.json_response(exc.body(), status=502)


async def _fetch(router: Router, hop: str, url: str, path: str, body: dict,
                 headers: dict) -> tuple[int, str, bytes]:
    """POST ``body`` and read the whole answer: status, content type, bytes."""
    try:
        async with router.session.post(url + path, json=body, headers=headers) as resp:
            return resp.status, resp.headers.get("Content-Type", "application/json"), await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise BackendError(hop, url, router.reason(exc)) from None


async def _relay(request: web.Request, router: Router, hop: str, url: str, method: str,
                 body: dict | None, headers: dict) -> web.StreamResponse:
    """Send the request on and hand the answer back: SSE chunk by chunk as it arrives, else whole."""
    try:
        resp = await router.session.request(method, url + request.path, json=body, headers=headers)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise BackendError(hop, url, router.reason(exc)) from None
    async with resp:
        content_type = resp.headers.get("Content-Type", "application/json")
        if resp.content_type != "text/event-stream":
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise BackendError(hop, url, router.reason(exc)) from None
            return web.Response(status=resp.status, body=raw, headers={"Content-Type": content_type})
        out = web.StreamResponse(status=resp.status,
                                 headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await out.prepare(request)
        while True:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = BackendError(hop, url, router.reason(exc) + " (mid-stream)")
                log.warning("%s (request %s)", error, headers.get("X-Request-Id"))
                chunk, last = b"data: " + json.dumps(error.body()).encode() + b"\n\n", True
            else:
                last = not chunk
            try:
                if chunk:
                    await out.write(chunk)
                if last:
                    await out.write_eof()
            except ConnectionResetError:
                # The client went away (clients often close on "[DONE]", before the end of
                # the chunked body): leaving the block closes the backend connection, which
                # makes vLLM abort the request if it is still running.
                return out
            if last:
                return out


async def _models(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    url = router.decode.pick()
    try:
        return await _relay(request, router, DECODE_HOP, url, "GET", None, {})
    except BackendError as exc:
        log.warning("%s (GET /v1/models)", exc)
        return web.json_response(exc.body(), status=502)


async def _health(request: web.Request) -> web.Response:
    """200 when every backend of both hops answers its /health with 200, else 503 naming the others."""
    router = request.app[ROUTER]

    async def probe(hop: str, url: str) -> dict:
        entry = {"hop": hop, "backend": url}
        try:
            async with router.session.get(url + "/health",
                                          timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S,
                                                                        sock_connect=router.connect_timeout_s)
                                          ) as resp:
                await resp.read()
                if resp.status == 200:
                    return dict(entry, status="ok")
                return dict(entry, status="error", error=f"/health answered {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return dict(entry, status="error", error=router.reason(exc))

    checks = await asyncio.gather(*(probe(hop.hop, url) for hop in (router.prefill, router.decode)
                                    for url in hop.urls))
    healthy = all(c["status"] == "ok" for c in checks)
    return web.json_response({"status": "ok" if healthy else "unavailable", "backends": checks},
                             status=200 if healthy else 503)
