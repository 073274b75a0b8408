"""The sticky-session cookie: an opaque token per backend, derived from the backend's *name*.

The token never reveals an address and is the same on every replica and across restarts, so
several tdproxy processes behind one DNS name agree on where a user belongs. With a secret it is
an HMAC, so a user cannot forge a token for a backend they were never placed on. Anything that
does not decode to a configured backend counts as no cookie.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


class StickyCodec:
    __slots__ = ("_by_token", "_secret", "_tokens")

    def __init__(self, names: Iterable[str], secret: str | None = None) -> None:
        self._secret = secret
        self._tokens = {name: self._derive(name) for name in names}
        self._by_token = {token: name for name, token in self._tokens.items()}

    def _derive(self, name: str) -> str:
        if self._secret is None:
            return hashlib.sha256(b"tdproxy-sticky:" + name.encode()).hexdigest()[:24]
        key = self._secret.encode()
        return hmac.new(key, b"tdproxy-sticky:" + name.encode(), hashlib.sha256).hexdigest()[:32]

    def token(self, name: str) -> str:
        return self._tokens[name]

    def decode(self, token: str) -> str | None:
        return self._by_token.get(token)


def cookie_value(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None (RFC 6265 §5.4 syntax)."""
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value.strip().strip(b'"')
    return None


def set_cookie_header(cookie: str, token: str, *, secure: bool, max_age: float | None) -> bytes:
    """A complete ``Set-Cookie`` header line (with CRLF) pinning the client to ``token``."""
    attributes = [f"{cookie}={token}", "Path=/", "HttpOnly", "SameSite=Lax"]
    if secure:
        attributes.append("Secure")
    if max_age is not None:
        attributes.append(f"Max-Age={int(max_age)}")
    return f"Set-Cookie: {'; '.join(attributes)}\r\n".encode("latin-1")
