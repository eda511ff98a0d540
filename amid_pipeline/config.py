"""Stage configs: dataclasses whose fields carry their help, validated in one pass.

A stage config is a flat TOML table (see ``stages/``). :func:`load_config` merges, in order, the
dataclass defaults, the file and command-line overrides, then reports *every* problem at once
(unknown keys with a suggestion, wrong types, values out of range, cross-field rules) as a
:class:`ConfigError`. The CLI builds its options from the same fields, so each setting has one name,
one default and one help text everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """One or more invalid settings; ``errors`` lists each, naming the key (and file)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(errors))


def setting(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
            maximum: float | None = None, required: bool = False) -> Any:
    """A config field with its help text and constraints (``required`` fields default to None)."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "required": required}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_type(cls: type, field: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional?) of a config field: int, float, str, bool or list."""
    hint = typing.get_type_hints(cls)[field.name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return (typing.get_origin(hint) or hint), optional


def _check_value(cls: type, field: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    base, optional = field_type(cls, field)
    meta = field.metadata
    if value is None or (meta.get("required") and value in ([], {})):
        if meta.get("required"):
            return value, f"{field.name}: required ({meta['help']})"
        return value, None if optional else f"{field.name}: must be set"
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        return value, f"{field.name}: expected {base.__name__}, got {type(value).__name__} {value!r}"
    if meta.get("choices") and value not in meta["choices"]:
        return value, f"{field.name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}"
    if meta.get("minimum") is not None and value < meta["minimum"]:
        return value, f"{field.name}: {value} is below the minimum {meta['minimum']}"
    if meta.get("maximum") is not None and value > meta["maximum"]:
        return value, f"{field.name}: {value} is above the maximum {meta['maximum']}"
    return value, None


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: no such config file"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}); a TOML config is UTF-8"]) from exc


def load_config(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Build ``cls`` from its defaults, the TOML file at ``path`` and ``overrides`` (None = not given)."""
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    errors: list[str] = []
    if path is not None:
        for key, value in read_toml(path).items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(f"{path}: unknown key {key!r}{hint}")
            else:
                values[key] = value
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    from_file = set(values) - set(overrides)
    values.update(overrides)
    for field in dataclasses.fields(cls):
        if field.name in values:
            values[field.name], error = _check_value(cls, field, values[field.name])
        else:
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            values[field.name], error = _check_value(cls, field, default)
        if error:
            errors.append(f"{path}: {error}" if field.name in from_file else error)
    if errors:
        raise ConfigError(errors)
    config = cls(**values)
    errors = list(config.check()) if hasattr(config, "check") else []
    if errors:
        raise ConfigError(errors)
    return config


def to_toml(config) -> str:
    """The resolved config as TOML (unset optional values omitted), to save beside every output."""
    return tomli_w.dumps({k: v for k, v in dataclasses.asdict(config).items() if v is not None})


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(to_toml(config), encoding="utf-8")
