"""Read the YAML file into a :class:`Config`, or explain every problem with its key path."""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import ValidationError

from tdproxy.config.model import Config, duplicate_names

DEFAULT_PATH = "config/tdproxy.yaml"
ENV_VAR = "TDPROXY_CONFIG"
MAX_FILE_BYTES = 4 * 1024 * 1024  # a config file bigger than this is refused, not parsed

# libyaml's parser when PyYAML was built with it: ~100x faster, and it refuses nesting deeper
# than 1000 levels itself (the pure-Python one runs out of recursion instead).
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(Exception):
    """The file could not be turned into a Config; ``errors`` holds one line per problem."""

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__(self.describe())

    def describe(self) -> str:
        lines = [f"{self.path}: invalid configuration ({len(self.errors)} error(s))"]
        lines.extend(f"  {error}" for error in self.errors)
        return "\n".join(lines)


def resolve_path(path: str | None) -> str:
    """The config path the CLI uses: the flag, else ``$TDPROXY_CONFIG``, else the default."""
    return path or os.environ.get(ENV_VAR) or DEFAULT_PATH


def key_path(loc: tuple[int | str, ...]) -> str:
    """``('backends', 1, 'weight')`` -> ``backends[1].weight``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "is required",
}


def _message(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "assertion_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "too_short" and error["loc"] == ("backends",):
        return "needs at least one backend"
    return str(error["msg"])


def _line(error: Any) -> str:
    message = _message(error)
    if not error["loc"] and message.startswith("backends"):
        return message  # a whole-config check that names its own key path
    return f"{key_path(error['loc'])}: {message}"


def _is_echo(error: Any) -> bool:
    # pydantic reports a list whose items failed as "too short" too; the item errors say it all.
    return bool(error["type"] == "too_short" and error.get("input"))


def parse_config(data: object, path: str = "<config>") -> Config:
    """Validate already-parsed YAML data."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["(top level): must be a mapping of keys to values"])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = [_line(e) for e in exc.errors() if not _is_echo(e)]
        # Whole-list checks do not run while an item is invalid; report duplicates anyway.
        for problem in duplicate_names(data.get("backends")):
            if not any(problem in error for error in errors):
                errors.append(problem)
        raise ConfigError(path, errors) from None


def read_config_text(path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            path, [f"the file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB: refused"]
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc}"]) from None


def load_yaml(text: str, path: str = "<config>") -> object:
    """The YAML document in ``text``; any failure to load it is a :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_Loader)  # a safe loader: the C one or the Python one
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [f"(yaml): not valid YAML{where}: {problem}"]) from None
    except RecursionError:
        raise ConfigError(path, ["(yaml): nested too deeply"]) from None
    except Exception as exc:  # e.g. ValueError for a date such as 2001-13-01
        raise ConfigError(path, [f"(yaml): cannot load the document: {exc}"]) from None


def parse_config_text(text: str, path: str = "<config>") -> Config:
    return parse_config(load_yaml(text, path), path)


def load_config(path: str) -> Config:
    """Read and validate the file at ``path``; raise :class:`ConfigError` on any problem."""
    return parse_config_text(read_config_text(path), path)
