"""HTTP/1.1 constants and small byte-level helpers for the hot path, all precomputed."""

from __future__ import annotations

from http import HTTPStatus

# RFC 9110 §7.6.1: connection-specific ("hop-by-hop") fields never forwarded. Transfer-Encoding is
# re-framed by tdproxy itself (RFC 9112 §6.1); Proxy-Connection is a legacy alias.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request fields tdproxy sets itself; the client's copies are dropped or merged.
FORWARDED_SET = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"})

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"

STATUS_LINES: dict[int, bytes] = {}


def status_line(code: int) -> bytes:
    """``HTTP/1.1 <code> <standard reason>\\r\\n`` (empty reason for an unknown code), cached;
    llhttp allows only three-digit codes, so the cache stays small."""
    line = STATUS_LINES.get(code)
    if line is None:
        try:
            reason = HTTPStatus(code).phrase.encode()
        except ValueError:
            reason = b""
        line = STATUS_LINES[code] = b"HTTP/1.1 %d %s\r\n" % (code, reason)
    return line


_REASONS = {
    400: "the request is malformed",
    403: "the request is not allowed",
    405: "tdproxy does not tunnel CONNECT",
    408: "the request did not arrive in time",
    413: "the request body is larger than allowed",
    414: "the request-target is longer than allowed",
    421: "the request was sent to the wrong server",
    431: "the request header section is larger than allowed",
    501: "not implemented",
    502: "the backend is unreachable or sent a broken response",
    503: "no backend is available",
    504: "the backend did not answer in time",
}


def _error_response(code: int, close: bool) -> bytes:
    phrase = HTTPStatus(code).phrase
    body = f"{code} {phrase}: {_REASONS.get(code, 'error')}\n".encode()
    head = [
        f"HTTP/1.1 {code} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
    ]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_ERRORS = {
    (code, close): _error_response(code, close) for code in _REASONS for close in (True, False)
}


def error_response(code: int, close: bool = True) -> bytes:
    """A complete plain-text response for a status tdproxy produces itself."""
    return _ERRORS.get((code, close)) or _error_response(code, close)


def error_body(code: int) -> bytes:
    """The plain-text body of :func:`error_response` alone (for HTTP/2, which frames it)."""
    response = error_response(code)
    return response[response.index(b"\r\n\r\n") + 4 :]


def error_body_length(code: int) -> int:
    return len(error_body(code))


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """RFC 9112 §3.2.2: ``http://host[:port]/path?q`` -> (authority, origin-form target)."""
    lowered = target[:8].lower()
    if lowered.startswith(b"http://"):
        rest = target[7:]
    elif lowered.startswith(b"https://"):
        rest = target[8:]
    else:
        return None
    slash = len(rest)
    for stop in (b"/", b"?"):
        position = rest.find(stop)
        if position != -1 and position < slash:
            slash = position
    authority = rest[:slash]
    path = rest[slash:]
    if b"@" in authority or not authority:
        return None
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def connection_tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",") if token.strip()]
