"""Training configs: commented TOML files with `[model]`, `[data]` and `[train]` sections.

Any key can be overridden on the command line as `--section.key=value`; the value
is read as a TOML literal (`--train.steps=200`, `--train.bf16=true`,
`--data.path="x"`), or as a plain string when it is not one. Unknown sections
and keys are errors that list the valid ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomllib

SECTIONS = ("model", "data", "train")


class ConfigError(ValueError):
    pass


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like --section.key=value (e.g. --train.steps=100)")
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; valid: {SECTIONS}")
        config.setdefault(section, {})[name] = parse_value(value)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; valid: {SECTIONS}")
    return apply_overrides(config, overrides or [])


def build_dataclass(cls: type, values: dict, section: str):
    """`cls(**values)` where an unknown key or a value of the wrong kind is a ConfigError naming it."""
    from xmodal.typed_config import build_config

    try:
        return build_config(cls, values, f"[{section}]")
    except ValueError as e:
        raise ConfigError(str(e)) from None
