"""One dataclass per job, filled from a YAML file and the command line.

Every job (``dreambooth``, ``sample``, ``eval``, ...) declares its options as a dataclass whose
fields carry ``metadata={"help": ...}``. :func:`parse_config` fills it from, in order of
precedence: command-line flags, ``--config FILE.yaml``, the dataclass defaults. Flags may be
written ``--key value``, ``--key=value``, ``key=value`` (torchtune style) or with dashes instead
of underscores; a bare ``--flag`` sets a boolean to true; list fields take several values
(``--seeds 0 1 2``) and repeated flags extend them (``--prompt a --prompt b``).

Unknown keys and values of the wrong type are refused with a :class:`UserError` that lists the
valid keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from difflora.errors import UserError

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_list(tp: Any) -> bool:
    tp, _ = _unwrap_optional(tp)
    return typing.get_origin(tp) in (list, tuple)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (a string from the command line or a YAML scalar) to type ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise UserError(f"option '{key}' cannot be empty; give a value of type {getattr(tp, '__name__', tp)}")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(key, v, item_tp) for v in items]
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"option '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UserError(f"option '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"option '{key}' expects an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"option '{key}' expects an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"option '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"option '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"option '{key}' expects a string, got {value!r}")
        return str(value)
    return value


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _unknown(key: str, fields: dict[str, dataclasses.Field]) -> UserError:
    return UserError(f"unknown option '{key}'; valid options: {', '.join(sorted(fields))}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax problems into one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of option: value")
    return data


def format_help(cls: type, prog: str) -> str:
    lines = [f"usage: {prog} [--config FILE.yaml] [--option value ...]", ""]
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc:
        lines += [doc[0], ""]
    for name, f in _fields(cls).items():
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default!r})"
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f" (default: {f.default_factory()!r})"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = " (required)"
        lines.append(f"  --{name}{default}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def parse_config(
    cls: type[C], argv: list[str] | None = None, prog: str = "difflora", positional: str | None = None
) -> C:
    """Build ``cls`` from ``--config`` YAML and command-line flags (flags win).

    A bare boolean flag (``--sdxl``) means true and takes the next token as its value only when
    that token is a boolean literal, so ``--sdxl DIR`` never swallows ``DIR``. ``positional``
    names the field that one bare argument fills (``make-tiny-model DIR``), wherever it stands.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = _fields(cls)
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(cls, prog))
        raise SystemExit(0)

    cli: dict[str, Any] = {}
    config_path = None
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok.startswith("--"):
            key, eq, inline = tok[2:].partition("=")
        elif "=" in tok and not tok.startswith("-"):
            key, eq, inline = tok.partition("=")
        elif positional is not None and positional not in cli:
            cli[positional] = tok
            continue
        else:
            raise UserError(f"unexpected argument '{tok}'; options are written --key value or key=value")
        key = key.replace("-", "_")
        if key == "config":
            if not eq:
                if i >= len(argv):
                    raise UserError("--config needs a YAML file path")
                inline = argv[i]
                i += 1
            config_path = inline
            continue
        if key not in fields:
            raise _unknown(key, fields)
        tp = fields[key].type
        if eq:
            values: list[str] = [inline]
        elif _unwrap_optional(tp)[0] is bool:
            values = ["true"]
            if i < len(argv) and argv[i].lower() in _TRUE | _FALSE:
                values = [argv[i]]
                i += 1
        else:
            values = []
            while i < len(argv) and not argv[i].startswith("--") and not (
                "=" in argv[i] and argv[i].split("=", 1)[0].replace("-", "_") in fields
            ):
                values.append(argv[i])
                i += 1
                if not _is_list(tp):
                    break
        if not values:
            if _unwrap_optional(tp)[0] is bool:
                values = ["true"]
            else:
                raise UserError(f"option --{key} needs a value")
        if _is_list(tp):
            cli.setdefault(key, []).extend(values)
        else:
            cli[key] = values[0]

    merged: dict[str, Any] = {}
    if config_path is not None:
        for key, value in load_yaml(config_path).items():
            key = str(key).replace("-", "_")
            if key not in fields:
                raise _unknown(key, fields)
            merged[key] = value
    merged.update(cli)

    kwargs = {key: _coerce(key, value, fields[key].type) for key, value in merged.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a job config, for manifests, model cards and checkpoints."""
    return dataclasses.asdict(cfg)
