"""``tdproxy weights``: the split a config asks for, and what a change makes of it.

Everything here is pure: it reads validated :class:`Config` objects and text, and returns new
weights, new text or lines to print. Reading and writing the file and asking the running proxy
are the command line's part (:mod:`tdproxy.cli`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tdproxy.config.model import Config
from tdproxy.config.yaml_edit import set_weights
from tdproxy.controlplane.changes import percent as share_percent

MAX_WEIGHT = 1_000_000


class WeightsError(Exception):
    """The request cannot be carried out on this config; the message says why."""


def weights_of(config: Config) -> dict[str, int]:
    return {backend.name: backend.weight for backend in config.backends}


def parse_assignments(arguments: Sequence[str], config: Config) -> dict[str, int]:
    """``["blue=0", "green=100"]`` -> ``{"blue": 0, "green": 100}``, checked against ``config``."""
    known = weights_of(config)
    result: dict[str, int] = {}
    for argument in arguments:
        name, equals, number = argument.partition("=")
        if not equals or not name:
            raise WeightsError(f"{argument!r}: expected NAME=WEIGHT, e.g. blue=70")
        if name not in known:
            raise WeightsError(f"unknown backend {name!r} (the backends are {', '.join(known)})")
        if name in result:
            raise WeightsError(f"{name}: given more than once")
        result[name] = _weight(argument, number)
    return result


def _weight(argument: str, number: str) -> int:
    if not number.isascii() or not number.isdigit() or int(number) > MAX_WEIGHT:
        raise WeightsError(
            f"{argument!r}: the weight must be a whole number from 0 to {MAX_WEIGHT}"
        )
    return int(number)


def swapped(config: Config) -> dict[str, int]:
    """The two non-backup backends with their weights exchanged."""
    main = [backend for backend in config.backends if not backend.backup]
    if len(main) != 2:
        names = ", ".join(backend.name for backend in main)
        raise WeightsError(
            f"swap needs exactly two non-backup backends; the config has {len(main)}: {names} "
            "(use `tdproxy weights set NAME=W ...`)"
        )
    first, second = main
    return {first.name: second.weight, second.name: first.weight}


def edited_text(text: str, config: Config, new: Mapping[str, int]) -> str:
    """``text`` with the weights in ``new`` written in (those already equal are left alone)."""
    index = {backend.name: i for i, backend in enumerate(config.backends)}
    changes = {
        index[name]: weight for name, weight in new.items() if weights_of(config)[name] != weight
    }
    names = {i: config.backends[i].name for i in changes}
    return set_weights(text, changes, names)


def side_effects(before: Config, after: Config, new: Mapping[str, int]) -> list[str]:
    """Backends whose weight the edit changed although nobody asked: they share it through a
    YAML anchor or merge key with a backend that was changed."""
    expected = {**weights_of(before), **new}
    problems = []
    for name, weight in weights_of(after).items():
        if weight != expected.get(name):
            problems.append(
                f"backend {name}: its weight would become {weight} rather than "
                f"{expected.get(name)}: it shares the weight through a YAML anchor or merge key "
                "(<<: *...); set its weight too, or write its own weight out"
            )
    return problems


# -- shares and output --------------------------------------------------------------------------


def shares(config: Config, weights: Mapping[str, int]) -> dict[str, float | None]:
    """Each backend's configured share of the traffic: weight over the non-backup weights;
    ``None`` for backups (they serve only while no other backend is healthy)."""
    main = [b.name for b in config.backends if not b.backup]
    total = sum(weights[name] for name in main)
    return {
        b.name: None if b.backup else (weights[b.name] / total if total else 0.0)
        for b in config.backends
    }


def percent(share: float | None) -> str:
    """``70%``, ``33.3%``; a share that is neither none nor all never reads ``0%`` or ``100%``."""
    if share is None:
        return "backup"
    value = share * 100
    if 0 < value < 0.1:
        return "<0.1%"
    if 99.9 < value < 100:
        return ">99.9%"
    return share_percent(share)


def _failover_note(config: Config) -> list[str]:
    if config.routing.method != "failover":
        return []
    return ["(routing.method is failover: weights are ignored; the first healthy backend serves)"]


def show_lines(config: Config) -> list[str]:
    """``blue   weight 70   70%``, one line per backend."""
    weights = weights_of(config)
    share = shares(config, weights)
    name_width = max(len(name) for name in weights)
    weight_width = max(len(str(weight)) for weight in weights.values())
    lines = [
        f"{name:<{name_width}}  weight {weight:<{weight_width}}  {percent(share[name])}"
        for name, weight in weights.items()
    ]
    return lines + _failover_note(config)


def change_lines(config: Config, new: Mapping[str, int]) -> list[str]:
    """``blue   70% -> 0%``, one line per backend; backups say ``backup``."""
    old_weights = weights_of(config)
    old = shares(config, old_weights)
    after = shares(config, {**old_weights, **new})
    width = max(len(name) for name in old_weights)
    lines = []
    for name in old_weights:
        if old[name] is None:
            lines.append(f"{name:<{width}}  backup")
        else:
            lines.append(f"{name:<{width}} {percent(old[name]):>4} -> {percent(after[name])}")
    return lines + _failover_note(config)


def configmap_hint(filename: str, command: str, *, certain: bool) -> list[str]:
    """What to do instead of editing a file mounted from a ConfigMap: the kubectl commands.
    The ConfigMap's name is not knowable from here, so it is written ``<configmap>``."""
    key = filename.replace(".", "\\.")
    first = (
        "Change the ConfigMap instead"
        if certain
        else "If it is mounted from a Kubernetes ConfigMap, change the ConfigMap instead"
    )
    return [
        f"{first}; tdproxy applies the mounted file by itself once Kubernetes updates it:",
        "  kubectl edit configmap <configmap>",
        "or apply an edited copy:",
        f"  kubectl get configmap <configmap> -o jsonpath='{{.data.{key}}}' > {filename}",
        f"  {command} --config {filename}",
        f"  kubectl create configmap <configmap> --from-file={filename} --dry-run=client -o yaml"
        " | kubectl apply -f -",
    ]
