"""The routing table: one config generation, ready for the hot path.

A :class:`RoutingTable` is built from a :class:`Config` and the observed :class:`BackendState`
objects. Everything a request needs (host header bytes, Set-Cookie lines, override lookups, the
selector over the currently eligible backends) is precomputed here. Health changes call
:meth:`RoutingTable.refresh`, which rebuilds the selector, so ``pick()`` never filters dead
backends. A reload builds a whole new table and the :class:`Router` swaps it in one assignment;
requests already running keep the table (and targets) they started with.

The weighted rotation is one cycle, not restarted by accident: a refresh whose eligible backends
and weights are the ones already in rotation keeps the selector as it is, and a new table with
the same rotation goes on from the old one's position (:meth:`RoutingTable.continue_rotation`).
A retry peeks at the rotation instead of picking from it, so it does not take anyone's turn.

Slow start (:mod:`tdproxy.routing.slow_start`): a refresh gives each backend the weight its ramp
allows at that moment (``Target.rotation_weight``, scaled with the rest of the table while any
ramp lasts) and sets ``ramp_ends``; while that is set, something must call refresh again on a
coarse schedule (the control plane's ``SlowStartDriver``), each step changing the weights and so
rebuilding the selector. Sticky pins and overrides ignore weights, so a ramp never moves them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from tdproxy.config.model import Backend, Config
from tdproxy.routing.selection import WeightedSelector
from tdproxy.routing.slow_start import RAMP_SCALE, ramp_fraction, selector_weight
from tdproxy.routing.state import BackendState
from tdproxy.routing.sticky import StickyCodec, cookie_value, set_cookie_header

if TYPE_CHECKING:
    from tdproxy.dataplane.endpoints import Endpoint


class Target:
    """One backend within one table generation: its config, derived bytes and observed state,
    and the data plane's endpoint for it (how to reach it is not routing's business)."""

    __slots__ = (
        "backend",
        "backup",
        "endpoint",
        "host_header",
        "name",
        "rotation_weight",
        "set_cookie",
        "state",
        "weight",
    )

    def __init__(self, backend: Backend, state: BackendState, endpoint: Endpoint) -> None:
        self.backend = backend
        self.name = backend.name
        self.weight = backend.weight
        self.rotation_weight = backend.weight  # the selector's weight: after slow start, scaled
        self.backup = backend.backup
        self.state = state
        self.endpoint = endpoint
        # None = preserve the client's Host header.
        if backend.host_header == "preserve":
            self.host_header: bytes | None = None
        elif backend.host_header == "backend":
            self.host_header = backend.authority.encode("idna")
        else:
            self.host_header = backend.host_header.encode("idna")
        self.set_cookie = b""

    def __repr__(self) -> str:
        return f"<Target {self.name} weight={self.weight} {self.state!r}>"


class RoutingTable:
    __slots__ = (
        "_codec",
        "_cookie_name",
        "_override_cookie",
        "_overrides",
        "_rotation",
        "_selector",
        "all_down",
        "by_name",
        "config",
        "generation",
        "method",
        "override_header",
        "ramp_ends",
        "reject_when_down",
        "scale",
        "sticky",
        "targets",
    )

    def __init__(
        self,
        config: Config,
        states: dict[str, BackendState],
        endpoint_for: Callable[[Backend], Endpoint],
        generation: int,
        secure_cookie: bool = False,
    ) -> None:
        self.config = config
        self.generation = generation
        routing = config.routing
        self.method = routing.method
        self.reject_when_down = routing.when_all_down == "reject"
        self.targets = [
            Target(
                backend,
                states.get(backend.name) or BackendState(backend.name),
                endpoint_for(backend),
            )
            for backend in config.backends
        ]
        self.by_name = {target.name: target for target in self.targets}
        self.sticky = self.method == "sticky"
        self._codec = StickyCodec(self.by_name, routing.sticky.secret)
        self._cookie_name = routing.sticky.cookie.encode()
        for target in self.targets:
            target.set_cookie = set_cookie_header(
                routing.sticky.cookie,
                self._codec.token(target.name),
                secure=secure_cookie,
                max_age=routing.sticky.max_age,
            )
        header = routing.override_header
        self.override_header = header.lower().encode() if header else None
        cookie = routing.override_cookie
        self._override_cookie = cookie.encode() if cookie else None
        self._overrides = self.override_header is not None or self._override_cookie is not None
        self.all_down = False
        self.scale = 1  # rotation weights are configured weights times this (slow start: 10)
        self.ramp_ends: float | None = None  # monotonic time the last ramp ends; None: none
        self._selector: WeightedSelector[Target] = WeightedSelector(())
        self._rotation: tuple[tuple[str, int], ...] | None = None  # what _selector rotates over
        self.refresh()

    # -- eligibility ---------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> None:
        """Rebuild the selector from current health and slow-start ramps (call after any health
        change, and while ``ramp_ends`` is set, every ramp step). ``now`` is monotonic seconds.
        When the eligible backends and their weights are unchanged, the selector and its
        position in the rotation are kept: a flip elsewhere (a backup, a drained backend) moves
        nothing."""
        self._ramp(time.monotonic() if now is None else now)
        healthy_main = [t for t in self.targets if t.state.healthy and not t.backup]
        healthy_backup = [t for t in self.targets if t.state.healthy and t.backup]
        self.all_down = not healthy_main and not healthy_backup
        entries = self._entries(healthy_main, healthy_backup)
        rotation = tuple((target.name, weight) for target, weight in entries)
        if rotation != self._rotation:
            self._selector = WeightedSelector(entries)
            self._rotation = rotation

    def _ramp(self, now: float) -> None:
        """Set every target's rotation weight for ``now``, and ``scale`` and ``ramp_ends``."""
        # Failover ignores weights: there is nothing to ramp.
        window = self.config.routing.slow_start if self.method != "failover" else None
        fractions = {
            target: ramp_fraction(target.state.ramp_started, window, now)
            if target.state.healthy and target.weight > 0
            else 1.0
            for target in self.targets
        }
        ramping = [target for target, fraction in fractions.items() if fraction < 1.0]
        self.scale = RAMP_SCALE if ramping else 1
        for target, fraction in fractions.items():
            target.rotation_weight = selector_weight(target.weight, fraction, self.scale)
        if ramping and window is not None:
            self.ramp_ends = max(t.state.ramp_started or now for t in ramping) + window
        else:
            self.ramp_ends = None

    def effective_weight(self, target: Target) -> float:
        """``target``'s weight after slow start, in configured units (the configured weight
        when it is not ramping): what the rotation gives it now, relative to the others'."""
        return target.rotation_weight / self.scale

    def _entries(
        self, healthy_main: list[Target], healthy_backup: list[Target]
    ) -> list[tuple[Target, int]]:
        """The eligible targets with the weights they rotate by."""
        if self.method == "failover":
            chosen = healthy_main[:1] or healthy_backup[:1]
            if not chosen and not self.reject_when_down:
                chosen = [t for t in self.targets if not t.backup][:1]
            return [(t, 1) for t in chosen]
        entries = [(t, t.rotation_weight) for t in healthy_main if t.weight > 0]
        if not entries and healthy_main:
            # Only drained (weight 0) backends are healthy: they serve rather than nobody.
            entries = [(t, 1) for t in healthy_main]
        if not entries and healthy_backup:
            entries = _weighted_or_equal(healthy_backup)
        if not entries and not self.reject_when_down:
            # Every weighted backend is marked down: try them anyway (the checks may be wrong).
            entries = [
                (t, t.rotation_weight) for t in self.targets if not t.backup and t.weight > 0
            ]
            entries = entries or _weighted_or_equal([t for t in self.targets if not t.backup])
        return entries

    def continue_rotation(self, previous: RoutingTable) -> None:
        """Take over ``previous``'s place in the rotation when both rotate over the same
        backends (by name) with the same weights; a reload that changes neither does not start
        the cycle again. Call it just before this table replaces ``previous``."""
        if self._rotation == previous._rotation:
            self._selector.resume(previous._selector)

    def eligible(self) -> list[Target]:
        return self._selector.items

    # -- picking -------------------------------------------------------------------------

    def pick(self, cookie: bytes | None = None, override: bytes | None = None) -> Target | None:
        """The target for a request. ``cookie`` is the raw Cookie header, ``override`` the raw
        value of the override header; both only matter when the table is configured for them."""
        if self._overrides:
            target = self.overridden(cookie, override)
            if target is not None:
                return target
        if cookie is not None and self.sticky:
            pinned = self.pinned(cookie)
            if pinned is not None:
                return pinned
        return self._selector.pick()

    def overridden(self, cookie: bytes | None, override: bytes | None) -> Target | None:
        """The backend a tester's override header or cookie names, when overrides are on."""
        if override is not None and self.override_header is not None:
            target = self.by_name.get(override.strip().decode("latin-1"))
            if target is not None:
                return target
        if cookie is not None and self._override_cookie is not None:
            value = cookie_value(cookie, self._override_cookie)
            if value is not None:
                return self.by_name.get(value.decode("latin-1"))
        return None

    def sticky_cookie_for(
        self, target: Target, cookie: bytes | None, override: bytes | None
    ) -> bytes:
        """The Set-Cookie line a sticky answer from ``target`` needs: none when the client is
        already pinned there, and none for an override (a tester's visit must not re-pin)."""
        if not self.sticky:
            return b""
        if cookie is not None and self.pinned(cookie) is target:
            return b""
        if self.overridden(cookie, override) is target:
            return b""
        return target.set_cookie

    def pinned(self, cookie: bytes) -> Target | None:
        """The backend a sticky cookie pins to, if it may still serve that user."""
        value = cookie_value(cookie, self._cookie_name)
        if value is None:
            return None
        name = self._codec.decode(value.decode("latin-1"))
        target = self.by_name.get(name) if name is not None else None
        if target is None:
            return None
        if self.all_down:
            return None if self.reject_when_down else target
        if not target.state.healthy:
            return None
        if target.backup and any(t.state.healthy and not t.backup for t in self.targets):
            return None
        return target

    def alternative(self, exclude: Iterable[Target]) -> Target | None:
        """Another target for a retry: never one in ``exclude``, never the same twice.

        It is the one the rotation would give next were the tried ones not in it, found without
        moving the rotation: a backend that keeps failing must not make the next request skip
        the backend whose turn it is."""
        tried = set(exclude)
        target = self._selector.peek(tried)
        if target is not None or self.method != "failover":
            return target
        # Failover keeps one target eligible; its retries go down the list of healthy ones.
        fallback = [t for t in self.targets if t.state.healthy and not t.backup]
        fallback += [t for t in self.targets if t.state.healthy and t.backup]
        for target in fallback:
            if target not in tried:
                return target
        return None

    def __repr__(self) -> str:
        return f"<RoutingTable gen={self.generation} {self.method} {self._selector!r}>"


def _weighted_or_equal(targets: list[Target]) -> list[tuple[Target, int]]:
    if any(t.weight > 0 for t in targets):
        return [(t, t.rotation_weight) for t in targets if t.weight > 0]
    return [(t, 1) for t in targets]
