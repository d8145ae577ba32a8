"""Typed configs: nested dataclasses read from YAML, overridden by `section.key=value`, checked up front.

    cfg = load_config(SFTConfig, "configs/recipes/sft_tiny_sdar_moe.yaml", ["train.steps=20", "parallel.tp=2"])

An unknown key, a value of the wrong type or a choice outside its options is a ConfigError that names the
key (and the file), raised before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

import yaml

from dare_mega.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true / false. YAML 1.1 also reads on/off/yes/no as booleans, which would turn
    choices such as `algorithm.routing_replay=off` or `logging.wandb: off` into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(text_or_file):
    """A YAML document (a string or an open file) with YAML 1.2 booleans."""
    return yaml.load(text_or_file, Loader=_Loader)


def choices(*options):
    """A field whose value must be one of `options` (kept in the field metadata)."""
    return {"choices": options}


def _coerce(value, tp, key: str, source: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: {key}={value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}={value!r} must be a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}={value!r} must be a string")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")
    return value


def from_dict(cls, data, source: str = "config", prefix: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types (naming them)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known: {', '.join(sorted(fields))}"
        raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")
    values = {}
    for name, value in data.items():
        field = fields[name]
        value = _coerce(value, hints[name], prefix + name, source)
        allowed = field.metadata.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(f"{source}: {prefix}{name}={value!r}; expected one of {', '.join(map(str, allowed))}")
        values[name] = value
    return cls(**values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """`a.b=value` pairs into a nested dict; values are parsed as YAML (numbers, booleans, lists, null)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        value = read_yaml(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def load_config(cls, path: str | None = None, overrides: list[str] = ()):
    """Read YAML (optional), apply overrides, build and return the typed config."""
    data: dict = {}
    source = path or "defaults"
    if path:
        try:
            with open(path) as f:
                data = read_yaml(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no such config file") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    data = apply_overrides(data, list(overrides))
    if overrides:
        source = f"{source} + overrides"
    config = from_dict(cls, data, source)
    check = getattr(config, "check", None)
    if check:
        check(source)
    return config
