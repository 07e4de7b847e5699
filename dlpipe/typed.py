"""Dataclasses from nested mappings (YAML, JSON) with type checks: every error is a ConfigError
that names the dotted key, what was expected and what was received. Generic: dlpipe.config
builds its schema with it, dlpipe.tracking rebuilds a logged model's hyperparameters with it."""

from __future__ import annotations

import dataclasses
import datetime
import typing
from typing import Any, Literal

from dl.models import ParamError
from dlpipe.errors import ConfigError


def split_key(root: type, dotted: str) -> list[str]:
    """`spark.conf.spark.ui.enabled` -> ["spark", "conf", "spark.ui.enabled"]: below a free-form
    mapping (such as Spark settings) the rest of the key is one name."""
    parts, cls = dotted.split("."), root
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        tp = hints.get(part)
        if typing.get_origin(tp) is dict:
            return parts[: i + 1] + ([".".join(parts[i + 1 :])] if i + 1 < len(parts) else [])
        if tp is None or not dataclasses.is_dataclass(tp):
            return parts
        cls = tp
    return parts


def nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where}': expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (expected one of: {', '.join(sorted(fields))})"
        )
    optional = {f.name for f in fields.values()
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    missing = sorted(set(fields) - set(raw) - optional)
    if missing:
        raise ConfigError(f"missing config key '{prefix}{missing[0]}'")
    raw = {name: _with_defaults(fields[name], hints[name], value) for name, value in raw.items()}
    try:
        return cls(**{name: _check(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw})
    except ParamError as exc:  # a model's own check of its hyperparameters
        raise ConfigError(f"config key '{prefix}{exc.field}': {exc.message}") from None


def _with_defaults(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A mapping given for a dict-typed field with a default is merged over that default (the
    Spark settings one sets are added to the defaults, not put in their place)."""
    if typing.get_origin(tp) is dict and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
        return {**f.default_factory(), **value}
    return value


def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[X, ...], given as a list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return tuple(_check(typing.get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        if val_tp is str:  # free-form settings such as Spark conf: scalars become strings
            return {str(k): _scalar_str(v, f"{key}.{k}") for k, v in value.items()}
        return {str(k): _check(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-01-02 as a date
            value = value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module, not user input


def _scalar_str(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"config key '{key}': expected a scalar value, got {value!r}")
