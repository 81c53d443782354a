"""One dataclass per job, filled from a YAML file and the command line.

Every job (``dreambooth``, ``sample``, ``eval``, ...) declares its options as a dataclass whose
fields carry ``metadata={"help": ...}``. :func:`parse_config` fills it from, in order of
precedence: command-line flags, ``--config FILE.yaml``, the dataclass defaults. Flags may be
written ``--key value``, ``--key=value``, ``key=value`` (torchtune style) or with dashes instead
of underscores; a bare ``--flag`` sets a boolean to true; list fields take several values
(``--seeds 0 1 2``) and repeated flags extend them (``--prompt a --prompt b``).

Unknown keys and values of the wrong type are refused with a :class:`UserError` that lists the
valid keys, so a typo never silently falls back to a default. Every float option must be finite:
NaN and infinity are refused at parse time because no option gives them a meaning (options that
can be switched off use 0 or are left unset), and a NaN would otherwise pass every ``<`` / ``>``
range check in ``validate()`` and surface steps later as NaN weights or a crash.

Paths in a config file are relative to the file: a relative value that names an existing file or
folder beside the config is resolved against the config's folder, so a config (and the shipped
``configs/``, in a checkout or an installed wheel) works from any working directory. Other values
(hub ids, output folders, paths that exist only from the working directory) are kept as written.
Every job also takes ``--verbose`` (library warnings and progress bars; see :mod:`difflora.console`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
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


def coerce_option(key: str, value: Any, tp: Any) -> Any:
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
        return [coerce_option(key, v, item_tp) for v in items]
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
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"option '{key}' expects a number, got {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"option '{key}' must be a finite number, got {value!r}")
        return number
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
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.75)
    hint = f"did you mean --{close[0]}? " if close else ""
    return UserError(f"unknown option '{key}'; {hint}valid options: {', '.join(sorted(fields))}")


def read_text(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped), or one line naming the problem.

    Every text file difflora reads (configs, captions, prompts, layouts, manifests) comes through
    here, so an encoding or permission problem is a :class:`UserError` naming the file, never a
    traceback. ``what`` says which file it is ("caption file", "layout file", ...).
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start}); save it with UTF-8 encoding") from None
    except OSError as err:
        raise UserError(f"cannot read {what} '{path}' ({err.strerror or type(err).__name__}); "
                        "check the path and its permissions") from None


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a torch device this machine does not have, before any model is loaded.

    ``None`` means "pick one automatically" and passes. Without this a missing GPU surfaces as a
    traceback from deep inside ``.to(device)`` after the slow model load. Jobs call it first
    thing, not in ``validate()``: a config written for a GPU machine still parses anywhere.
    """
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} '{device}' is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{flag} '{device}': this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"{flag} '{device}': this machine has {count} CUDA GPU(s) (cuda:0 to "
                            f"cuda:{count - 1}); pick one of them")
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        raise UserError(f"{flag} '{device}': no {dev.type} device is available on this machine; use --device cpu")


def check_image_size(height: int | None, width: int | None, flags: tuple[str, str] = ("--height", "--width")
                     ) -> None:
    """Refuse an image size the pipelines cannot make: positive multiples of 8 (the VAE's factor).

    Checked with the other options, so a bad size fails at once instead of inside the pipeline
    after the model has loaded. ``None`` means the model's own size and passes.
    """
    for flag, value in zip(flags, (height, width)):
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"{flag} must be a positive multiple of 8, got {value}; e.g. {max(8, round(value / 8) * 8)}")


# Bounds of the numeric options the training jobs share: name -> (lowest, lowest allowed?, highest
# excluded). A value outside them is meaningless (a negative warm-up, a beta of 1) and would either
# crash deep in set-up or train silently wrong. NaN / inf never get here (refused by the parser).
TRAINING_BOUNDS: dict[str, tuple[float, bool, float | None]] = {
    **{name: (0, True, None) for name in (
        "lr_warmup_steps", "num_class_images", "num_validation_images", "dataloader_num_workers",
        "checkpoints_total_limit", "prior_loss_weight", "adam_weight_decay", "sgd_momentum", "noise_offset",
        "text_encoder_lr", "embedding_lr", "unet_lr", "embedding_freeze_norm", "init_std", "lr_power",
        "max_grad_norm", "optimizer_reg", "preconditioner_log_steps")},
    **{name: (0, False, None) for name in (
        "learning_rate", "lr_num_cycles", "adam_epsilon", "snr_gamma", "lora_alpha", "validation_inference_steps",
        "validation_steps", "validation_epochs", "rank", "train_batch_size", "gradient_accumulation_steps",
        "num_train_epochs", "checkpointing_steps", "max_train_steps")},
    "adam_beta1": (0, True, 1),
    "adam_beta2": (0, True, 1),
    "seed": (0, True, 2**63),
}


def check_bounds(cfg: Any, bounds: dict[str, tuple[float, bool, float | None]] = TRAINING_BOUNDS) -> None:
    """Refuse options of ``cfg`` outside ``bounds``; options ``cfg`` lacks, or leaves unset, pass."""
    for name, (low, inclusive, high) in bounds.items():
        value = getattr(cfg, name, None)
        if value is None or isinstance(value, bool):
            continue
        if value < low or (value == low and not inclusive) or (high is not None and value >= high):
            rule = f">= {low:g}" if inclusive else f"> {low:g}"
            rule += f" and < {high:g}" if high is not None else ""
            raise UserError(f"--{name} must be {rule}, got {value}")


def _beside(value: Any, folder: Path) -> Any:
    """``value`` resolved against ``folder`` when it is a relative path that exists there (recursing
    into lists and mappings); anything else unchanged."""
    if isinstance(value, dict):
        return {k: _beside(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_beside(v, folder) for v in value]
    if not isinstance(value, str) or not value.strip() or "\n" in value or "://" in value or len(value) > 1024:
        return value
    if Path(value).is_absolute() or value in (".", ".."):
        return value
    candidate = folder / value
    try:
        exists = candidate.exists()
    except (OSError, ValueError):
        return value
    return os.path.normpath(candidate) if exists else value


def resolve_config_paths(values: dict[str, Any], config_file: str | Path) -> dict[str, Any]:
    """The values of a config file with relative paths that exist beside it resolved against its folder."""
    folder = Path(config_file).parent
    return {k: _beside(v, folder) for k, v in values.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax problems into one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; check the path given to --config")
    try:
        data = yaml.safe_load(read_text(path, "config file")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of option: value")
    return data


def _group_of(cls: type, name: str) -> str:
    """The title of the option group that declares ``name``: the most basic class declaring it."""
    owner = cls
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}) and dataclasses.is_dataclass(klass):
            owner = klass
    if owner is cls:
        return f"{cls.__name__.removesuffix('Config')} options"
    title = re.sub(r"(?<!^)(?=[A-Z][a-z])", " ", owner.__name__.removesuffix("Options")).strip()
    return title.replace("Lo RA", "LoRA") or "Options"


def format_help(cls: type, prog: str) -> str:
    """``--help``: options under the group that declares them, with type or choices and default."""
    lines = [f"usage: {prog} [--config FILE.yaml] [--option value ...]", ""]
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc:
        lines += [doc[0], ""]
    hints = typing.get_type_hints(cls)
    groups: dict[str, list[str]] = {}
    for name, f in _fields(cls).items():
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default!r})"
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f" (default: {f.default_factory()!r})"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = " (required)"
        tp, _ = _unwrap_optional(hints.get(name, str))
        if typing.get_origin(tp) is typing.Literal:
            kind = "{" + ",".join(map(str, typing.get_args(tp))) + "}"
        elif typing.get_origin(tp) in (list, tuple):
            kind = f"{getattr((typing.get_args(tp) or (str,))[0], '__name__', 'value')} ..."
        else:
            kind = "" if tp is bool else getattr(tp, "__name__", "value")
        entry = [f"  --{name}{' ' + kind if kind else ''}{default}"]
        if f.metadata.get("help"):
            entry.append(f"      {f.metadata['help']}")
        groups.setdefault(_group_of(cls, name), []).extend(entry)
    groups.setdefault("Console", []).extend(
        ["  --verbose", "      show the libraries' warnings, log messages and loading bars (hidden by default)"])
    for title, entries in groups.items():
        lines += [f"{title}:", *entries, ""]
    return "\n".join(lines).rstrip() + "\n"


# Other tools' names for difflora options, accepted on the command line and in config files
# (only where the config has the target option).
ALIASES: dict[str, str] = {"enable_bucket": "bucket"}


def _alias(key: str, fields: dict[str, Any]) -> str:
    target = ALIASES.get(key)
    return target if target is not None and key not in fields and target in fields else key


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
    if "verbose" not in fields:
        from difflora.console import pop_verbose, setup

        argv, verbose = pop_verbose(argv)
        if verbose:
            setup(verbose=True)
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
        key = _alias(key.replace("-", "_"), fields)
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
        for key, value in resolve_config_paths(load_yaml(config_path), config_path).items():
            key = _alias(str(key).replace("-", "_"), fields)
            if key not in fields:
                raise _unknown(key, fields)
            merged[key] = value
    merged.update(cli)
    return config_from_mapping(cls, merged)


def config_from_mapping(cls: type[C], values: dict[str, Any], source: str | None = None) -> C:
    """Build and validate ``cls`` from a mapping of option -> value (strings or YAML/JSON scalars).

    Every value goes through the same coercion as a command-line flag, so a file written by
    difflora (a manifest) or by hand is held to the flags' rules. ``source`` names the file in
    messages about unknown keys.
    """
    fields = _fields(cls)
    where = f" in '{source}'" if source else ""
    kwargs = {}
    for key, value in values.items():
        key = _alias(str(key).replace("-", "_"), fields)
        if key not in fields:
            raise UserError(f"unknown option '{key}'{where}; valid options: {', '.join(sorted(fields))}")
        try:
            kwargs[key] = coerce_option(key, value, fields[key].type)
        except UserError as err:
            raise UserError(f"{err}{where}") from None
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"missing required option(s){where}: {', '.join('--' + m for m in missing)}")
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except UserError as err:
            raise UserError(f"{err}{where}") from None
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a job config, for manifests, model cards and checkpoints."""
    return dataclasses.asdict(cfg)
