"""Disaggregated prefill/decode: ``proxy.build_app`` is the router that sends each
request to a prefill instance, then to a decode instance with the KV it stored.

The defaults live here, not in ``proxy``, so that ``stratacache --help`` shows
them without importing aiohttp.
"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8100
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Longest silence accepted from a backend. A non-streamed prefill sends nothing until
# the whole prompt is computed, which takes minutes for long prompts on a CPU.
DEFAULT_READ_TIMEOUT_S = 600.0
