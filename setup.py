"""Optional compiled build of the hot path: ``TDPROXY_COMPILE=1 pip install --no-build-isolation .``

Without ``TDPROXY_COMPILE=1`` this is the plain pure-Python package (everything is declared in
pyproject.toml). With it, the modules below are compiled to C extensions with mypyc (which
comes with mypy, so the build needs mypy and tdproxy's dependencies installed: hence
``--no-build-isolation``). The compiled modules are the same source, checked by the same strict
mypy; the pure-Python files stay in the package as the fallback. benchmarks/RESULTS.md has the
measurement that decided it: CPU per request on the hot path.
"""

from __future__ import annotations

import os

from setuptools import setup

# The per-request path: parsing, routing, relaying, HTTP/2 streams, the access log line.
# A class that derives from a compiled class must be compiled too (interpreted classes cannot
# inherit from compiled ones): keep subclasses of these modules' classes in this list.
COMPILED = [
    "tdproxy/dataplane/lifecycle.py",
    "tdproxy/dataplane/http.py",
    "tdproxy/dataplane/exchange.py",
    "tdproxy/dataplane/pool.py",
    "tdproxy/dataplane/upstream.py",
    "tdproxy/dataplane/dispatch.py",
    "tdproxy/dataplane/client_io.py",
    "tdproxy/dataplane/relay.py",
    "tdproxy/dataplane/client.py",
    "tdproxy/dataplane/forwarded.py",
    "tdproxy/dataplane/redirect_listener.py",
    "tdproxy/dataplane/proxy_protocol.py",
    "tdproxy/dataplane/h2_stream.py",
    "tdproxy/dataplane/h2_server.py",
    "tdproxy/routing/selection.py",
    "tdproxy/routing/sticky.py",
    "tdproxy/routing/state.py",
    "tdproxy/routing/table.py",
    "tdproxy/observability/access_log.py",
]


def _extensions() -> list[object]:
    if os.environ.get("TDPROXY_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=_extensions())
