"""Writing new weights into the config file: the one path ``tdproxy weights set``/``swap`` and
``tdproxy rollout`` share.

:func:`prepare_weights` reads and validates the file, splices the new weight values into its text
(:mod:`tdproxy.config.yaml_edit`: every other byte kept) and validates the result as
``tdproxy check`` would, including that no other backend's weight changes with it (a weight
shared through a YAML anchor or merge key). Nothing is written until :meth:`WeightEdit.write`,
which replaces the file atomically (:mod:`tdproxy.config.writer`). Every failure is an exception
that says why: :class:`ConfigError` (the file itself is invalid), :class:`WeightsError` or
:class:`EditError` (the change cannot be made; the file is untouched), :class:`NotWritable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tdproxy import weights
from tdproxy.config.loader import ConfigError, parse_config_text, read_config_text
from tdproxy.config.model import Config
from tdproxy.config.writer import replace_file


def load_and_build(path: str) -> tuple[str, Config]:
    """Read, parse and validate the file, and build its routing table once, as a reload does:
    every failure, expected or not, is a :class:`ConfigError` that says what went wrong."""
    text = read_config_text(path)
    return text, check_text(text, path)


def check_text(text: str, path: str) -> Config:
    """Parse and validate ``text`` and build its routing table once, as :func:`load_and_build`."""
    from tdproxy.dataplane.endpoints import Endpoints
    from tdproxy.routing.router import Router

    config = parse_config_text(text, path)
    try:
        Router(config, Endpoints())
    except Exception as exc:
        raise ConfigError(path, [f"cannot build the routing table: {exc}"]) from None
    return config


@dataclass(frozen=True)
class WeightEdit:
    """A validated change of weights, not yet written: the file's text before and after."""

    path: str
    text: str
    config: Config  # the file as it is now
    new: Mapping[str, int]  # the weights asked for (a subset of the backends)
    new_text: str

    @property
    def changed(self) -> bool:
        return self.new_text != self.text

    @property
    def before(self) -> dict[str, int]:
        return weights.weights_of(self.config)

    @property
    def after(self) -> dict[str, int]:
        """Every backend's weight once written."""
        return {**self.before, **self.new}

    def shares(self) -> tuple[dict[str, float | None], dict[str, float | None]]:
        """Each backend's configured share before and after (``None`` for backups)."""
        return weights.shares(self.config, self.before), weights.shares(self.config, self.after)

    def write(self) -> None:
        """Replace the file atomically; :class:`NotWritable` leaves it as it was."""
        replace_file(self.path, self.new_text)


def prepare_weights(
    path: str, new: Mapping[str, int], *, text: str | None = None, config: Config | None = None
) -> WeightEdit:
    """Validate setting ``new`` in the file at ``path`` (or in ``text``/``config`` already read
    from it); raises as the module says, and writes nothing."""
    if text is None or config is None:
        text, config = load_and_build(path)
    unknown = sorted(set(new) - set(weights.weights_of(config)))
    if unknown:
        raise weights.WeightsError(f"unknown backend {unknown[0]!r}")
    new_text = weights.edited_text(text, config, new)
    try:
        after = check_text(new_text, path)
    except ConfigError as exc:
        raise weights.WeightsError(
            "the new weights would make the config invalid: " + "; ".join(exc.errors)
        ) from None
    problems = weights.side_effects(config, after, new)
    if problems:
        raise weights.WeightsError("; ".join(problems))
    return WeightEdit(path, text, config, dict(new), new_text)
