"""Typer commands whose options are generated from a stage config dataclass.

Every field becomes ``--field-name`` with the field's help; an option left out keeps the value from
``--config`` (or the default). Expected failures (bad config, bad input) print one line and exit 1;
``AMID_PIPELINE_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from amid_pipeline.config import ConfigError, field_type, load_config
from amid_pipeline.shards.schema import FormatError
from amid_pipeline.shards.storage import StorageError


class UserError(Exception):
    """An expected failure whose message alone tells the user what to fix."""


EXPECTED_ERRORS = (UserError, ConfigError, FormatError, FileNotFoundError, StorageError)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(code)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn expected errors into one red line and a non-zero exit."""
    if os.environ.get("AMID_PIPELINE_TRACEBACK"):
        return fn()
    try:
        return fn()
    except EXPECTED_ERRORS as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; run the same command again to resume", code=130) from None


def _option_help(field: dataclasses.Field) -> str:
    meta = field.metadata
    text = meta["help"]
    if meta.get("choices"):
        text += f" [choices: {', '.join(map(str, meta['choices']))}]"
    if meta.get("required"):
        text += " [required, here or in --config]"
    elif field.default is not dataclasses.MISSING and field.default is not None:
        text += f" [config default: {field.default}]"
    return text


def config_command(app: typer.Typer, name: str, config_cls: type, help: str,
                   run: Callable[[Any], None], positional: tuple[str, ...] = ()) -> None:
    """Register ``name`` on ``app``: load ``config_cls`` from --config + options, then ``run(config)``."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Optional[Path], typer.Option("--config", "-c", help="Stage config file (TOML); see stages/.")],
        )
    ]
    for field in sorted(dataclasses.fields(config_cls), key=lambda f: not f.metadata.get("required")):  # required first
        base, _ = field_type(config_cls, field)
        if base in (list, dict):
            base = str  # lists: "a,b"; tables: "key=value,key=value" (values in TOML syntax)
        if field.name in positional:
            info = typer.Argument(help=_option_help(field), show_default=False)
        elif base is bool:
            flag = field.name.replace("_", "-")
            info = typer.Option(f"--{flag}/--no-{flag}", help=_option_help(field), show_default=False)
        else:
            info = typer.Option(f"--{field.name.replace('_', '-')}", help=_option_help(field), show_default=False)
        params.append(
            inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[Optional[base], info])
        )

    def command(**kwargs: Any) -> None:
        path = kwargs.pop("config")
        overrides = {}
        for field in dataclasses.fields(config_cls):
            value = kwargs.get(field.name)
            kind = field_type(config_cls, field)[0]
            if value is not None and kind is list:
                value = [item.strip() for item in value.split(",") if item.strip()]
            elif value is not None and kind is dict:
                value = parse_table(field.name, value)
            overrides[field.name] = value
        run_guarded(lambda: run(load_config(config_cls, path, overrides)))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    command.__name__ = name.replace("-", "_")
    app.command(name, help=help)(command)


def parse_table(name: str, text: str) -> dict[str, Any]:
    """'alpha=-3,lam=0.1,divergence=ab' -> {'alpha': -3, 'lam': 0.1, 'divergence': 'ab'} (TOML values;
    a bare word is taken as a string)."""
    import tomllib

    table = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError([f"{name}: expected key=value, got {item!r}"])
        try:
            table[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = raw.strip()
    return table


def echo_table(rows: list[tuple[str, Any]]) -> None:
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
