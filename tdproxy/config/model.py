"""The configuration as the YAML file states it: strict, frozen pydantic models.

Every default lives here and only here. Unknown keys are errors (``extra="forbid"``), so a typo
never silently falls back to a default. These objects are *configured* state; what the proxy
learns at run time (health, counters) lives in :mod:`tdproxy.routing.state`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tdproxy.config.durations import Duration

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*(?:-\s*(\d{3}))?\s*$")


def redact_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` before the host replaced by ``***@``."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at < 0:
        return url
    return f"{scheme}{separator}***@{rest[at + 1 :]}"


def duplicate_names(backends: object) -> list[str]:
    """``backends[i].name: 'x' is used more than once`` for raw or validated backend lists."""
    if not isinstance(backends, list | tuple):
        return []
    seen: dict[str, int] = {}
    problems = []
    for index, item in enumerate(backends):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            problems.append(
                f"backends[{index}].name: {name!r} is used more than once "
                f"(first at backends[{seen[name]}])"
            )
        else:
            seen[name] = index
    return problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_trusted_proxy(value: str) -> str:
    """An address or a CIDR block, IPv4 or IPv6, in its canonical spelling."""
    text = value.strip()
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set: did you mean {loose}?") from None
        raise ValueError(
            f"{text!r} is not an IP address or CIDR block (such as 10.0.0.0/8 or fd00::/8)"
        ) from None
    return str(network)


TrustedProxy = Annotated[str, AfterValidator(_check_trusted_proxy)]


class EntrypointTLS(_Model):
    certificate: str
    key: str


class Entrypoint(_Model):
    address: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    tls: EntrypointTLS | None = None
    redirect_http_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    # Peers whose X-Forwarded-Proto/-Host are kept and whose X-Forwarded-For hops are skipped
    # when X-Real-IP is derived (see dataplane/forwarded.py).
    trusted_proxies: tuple[TrustedProxy, ...] = ()
    # Every connection starts with a PROXY protocol v1 or v2 header (dataplane/proxy_protocol.py).
    proxy_protocol: bool = False
    # Offer HTTP/2 by ALPN at the TLS entrypoint (no effect without tls). Off by default: see
    # the README's HTTP/2 section for the measurements behind that.
    http2: bool = False

    @model_validator(mode="after")
    def _redirect_needs_tls(self) -> Entrypoint:
        if self.redirect_http_port is not None and self.tls is None:
            raise ValueError("redirect_http_port needs tls: it redirects plain HTTP to HTTPS")
        return self


class Sticky(_Model):
    cookie: Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")] = "TDSESSION"
    max_age: Duration | None = None
    secret: str | None = None

    @field_validator("max_age")
    @classmethod
    def _check_max_age(cls, value: float | None) -> float | None:
        # Max-Age is whole seconds: below 1 s it would be 0, which deletes the cookie at once.
        if value is not None and value < 1:
            raise ValueError("must be at least 1s (null = a session cookie)")
        return value


class Routing(_Model):
    method: Literal["round_robin", "sticky", "failover"] = "round_robin"
    sticky: Sticky = Sticky()
    override_header: Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")] | None = None
    override_cookie: Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")] | None = None
    when_all_down: Literal["fail_open", "reject"] = "fail_open"
    # A backend coming back up, added or raised from weight 0 ramps 10 % -> 100 %; null = off.
    slow_start: Duration | None = None


class Backend(_Model):
    name: str
    url: str
    weight: Annotated[int, Field(ge=0, le=1_000_000, strict=True)] = 1
    backup: bool = False
    host_header: str = "preserve"
    tls_verify: bool = True

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "must be 1-63 characters of letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        # Errors show the url with any user:password@ replaced, so credentials written there
        # by mistake never reach the log, the status page or the reload API.
        shown = repr(redact_userinfo(value))
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{shown} must start with http:// or https://")
        if "@" in parts.netloc:
            raise ValueError(f"{shown} must not carry credentials")
        if not parts.hostname:
            raise ValueError(f"{shown} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{shown} must not have a path, query or fragment")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"{shown} has an invalid port") from None
        return value

    @field_validator("host_header")
    @classmethod
    def _check_host_header(cls, value: str) -> str:
        if not value or any(c in value for c in " \t\r\n/\\@"):
            raise ValueError("must be 'preserve', 'backend' or a host name such as example.com")
        return value

    # Derived views of the url, computed on demand (the routing snapshot caches what it needs).
    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def authority(self) -> str:
        """The url's ``host[:port]`` exactly as written (what ``host_header: backend`` sends)."""
        return urlsplit(self.url).netloc


def _parse_status(value: object) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError("must be a status code or a range such as '200-399'")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str) and (match := _STATUS_RANGE.match(value)):
        low = int(match.group(1))
        high = int(match.group(2) or low)
    else:
        raise ValueError(f"{value!r} must be a status code or a range such as '200-399'")
    if not (100 <= low <= high <= 599):
        raise ValueError(f"{value!r} must be a status code or range within 100-599")
    return (low, high)


StatusRange = Annotated[tuple[int, int], BeforeValidator(_parse_status)]


class PassiveHealth(_Model):
    max_failures: Annotated[int, Field(ge=0)] = 3


MIN_HEALTH_INTERVAL = 0.1


class HealthCheck(_Model):
    enabled: bool = True
    type: Literal["http", "tcp"] = "http"
    path: str = "/"
    interval: Duration = 3.0
    timeout: Duration = 1.0  # > 0, as every duration
    fall: Annotated[int, Field(ge=1)] = 3
    rise: Annotated[int, Field(ge=1)] = 3
    expect_status: tuple[StatusRange, ...] = ((200, 200),)
    passive: PassiveHealth = PassiveHealth()

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in " \t\r\n"):
            raise ValueError("must start with '/' and contain no whitespace")
        return value

    @field_validator("expect_status", mode="before")
    @classmethod
    def _listify_expect(cls, value: object) -> object:
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise ValueError("needs at least one status code")
        return items

    @field_validator("interval")
    @classmethod
    def _check_interval(cls, value: float) -> float:
        if value < MIN_HEALTH_INTERVAL:
            raise ValueError("must be at least 100ms")
        return value

    def accepts(self, status: int) -> bool:
        return any(low <= status <= high for low, high in self.expect_status)


class Timeouts(_Model):
    connect: Duration = 10.0
    response_header: Duration = 60.0
    client_header: Duration = 15.0
    client_body: Duration = 60.0
    idle: Duration = 75.0
    shutdown_grace: Duration = 30.0
    client_send: Duration = 60.0  # a client that accepts no bytes this long is cut off
    tunnel_idle: Duration | None = None  # a WebSocket tunnel silent both ways; null = never
    upstream_idle: Duration = 30.0  # pooled backend connections idle this long are closed


class Limits(_Model):
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32768
    max_headers: Annotated[int, Field(ge=1)] = 100
    max_url_bytes: Annotated[int, Field(ge=16)] = 8192
    max_body_bytes: Annotated[int, Field(ge=0)] | None = None
    max_connections: Annotated[int, Field(ge=1)] = 10000


class Admin(_Model):
    address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9901
    token: str | None = None
    token_env: str | None = None

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: str | None) -> str | None:
        # An empty token would be matched by a bare "Authorization: Bearer".
        if value is not None and not value.strip():
            raise ValueError("must not be empty or blank (leave it out or null for no token)")
        return value

    @model_validator(mode="after")
    def _one_token_source(self) -> Admin:
        if self.token is not None and self.token_env is not None:
            raise ValueError("set either token or token_env, not both")
        return self


class AccessLog(_Model):
    enabled: bool = True
    format: Literal["json", "combined"] = "json"


MAX_WORKERS = 1024


def _check_workers(value: object) -> object:
    """``workers``: a whole number of processes, or ``auto`` (the CPUs this process may use)."""
    if value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f"must be a whole number from 1 to {MAX_WORKERS}, or auto")


Workers = Annotated[int | Literal["auto"], BeforeValidator(_check_workers)]


class Config(_Model):
    # Data-plane processes: 1 = one process, as always; N > 1 = a supervisor and N workers
    # (tdproxy.workers); auto = the CPUs this process may use. A restart applies a change.
    workers: Workers = 1
    entrypoint: Entrypoint = Entrypoint()
    routing: Routing = Routing()
    backends: tuple[Backend, ...] = Field(min_length=1)
    health_check: HealthCheck = HealthCheck()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    admin: Admin = Admin()
    access_log: AccessLog = AccessLog()

    @model_validator(mode="after")
    def _check_backends(self) -> Config:
        duplicates = duplicate_names([{"name": b.name} for b in self.backends])
        if duplicates:
            raise ValueError("; ".join(duplicates))
        if self.routing.method != "failover" and not any(b.weight > 0 for b in self.backends):
            raise ValueError("backends: at least one backend needs a weight above 0")
        if all(b.backup for b in self.backends):
            raise ValueError("backends: at least one backend must not be a backup")
        return self

    def backend(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)
