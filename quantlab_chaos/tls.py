"""One TLS context for every HTTP call the harness and the canary make.

httpx builds a new `ssl.SSLContext` for every client, and so for every `httpx.get` or `httpx.request`: it loads the
certificate authorities again each time, about 20 ms of CPU. A chaos run makes hundreds of such calls from every
worker, on a machine whose cores the services under test also need, so the calls share this one (the same
settings httpx would use: its CAs, and `SSL_CERT_FILE`/`SSL_CERT_DIR` where set). An `SSLContext` may be shared
between threads.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def context() -> ssl.SSLContext:
    """The shared context, built on first use; pass it as httpx's `verify=`."""
    return httpx.create_ssl_context(trust_env=True)
