"""Configuration: what the YAML file says, as strict frozen models."""

from tdproxy.config.loader import ConfigError, load_config, parse_config, parse_config_text
from tdproxy.config.model import Backend, Config

__all__ = ["Backend", "Config", "ConfigError", "load_config", "parse_config", "parse_config_text"]
