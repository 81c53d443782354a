"""LoRA file formats, one reader / writer each, registered by name.

Every format translates between its files and the normalised view
``{"<component>.<module path>": LoraLayer(down, up, scale, magnitude)}`` (see
:mod:`difflora.formats.base`); :mod:`difflora.lora_io` is the public front that collects layers from
models, picks formats by name and detects them in files.

========== =============================================== ==========================================
name       what it writes                                  who reads it
========== =============================================== ==========================================
diffusers  ``pytorch_lora_weights.safetensors``            ``pipe.load_lora_weights`` (scales in header)
kohya      ``pytorch_lora_weights_kohya.safetensors``      A1111, ComfyUI, kohya sd-scripts, diffusers
peft       ``peft/<component>/adapter_model.safetensors``  ``PeftModel.from_pretrained``
========== =============================================== ==========================================

ED-LoRA's concept file (``edlora.safetensors``) is a format of its own and lives with its job
(:mod:`difflora.mix_of_show.edlora`: ``save_edlora`` / ``load_edlora``): concept embeddings plus a
LoRA in the diffusers layout (written with :meth:`DiffusersFormat.encode`). It is not registered
here because its LoRA part alone is not the concept; ``is_edlora_file`` tells it apart.

Adding a format: a :class:`LoraFormat` subclass in a module of this package and one
:func:`register` call below.
"""

from __future__ import annotations

from collections.abc import Collection

from difflora.errors import UserError
from difflora.formats.base import COMPONENTS, LoraFormat, LoraLayer
from difflora.formats.diffusers import ADAPTER_METADATA_KEY, DIFFUSERS, DiffusersFormat
from difflora.formats.kohya import KOHYA, KohyaFormat, kohya_name_to_path
from difflora.formats.peft import PEFT, PeftFormat

FORMATS: dict[str, LoraFormat] = {}


def register(fmt: LoraFormat) -> LoraFormat:
    """Make ``fmt`` known by its name; :func:`detect` tries formats in registration order."""
    FORMATS[fmt.name] = fmt
    return fmt


def format_named(name: str) -> LoraFormat:
    """The registered format called ``name``; a UserError lists the valid names otherwise."""
    try:
        return FORMATS[name.strip()]
    except KeyError:
        raise UserError(f"unknown LoRA format '{name}'; valid: {', '.join(FORMATS)}") from None


def parse_formats(text: str | Collection[str]) -> list[LoraFormat]:
    """``"diffusers,kohya"`` (or a list of names) -> formats, in order, without repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out: list[LoraFormat] = []
    for name in names:
        if name.strip():
            fmt = format_named(name)
            if fmt not in out:
                out.append(fmt)
    if not out:
        raise UserError(f"no LoRA format given; valid: {', '.join(FORMATS)}")
    return out


def detect(keys: Collection[str]) -> LoraFormat:
    """The format of a file from its tensor keys alone."""
    if not keys:
        raise UserError("the LoRA file holds no tensors; pass a LoRA saved by a trainer")
    for fmt in FORMATS.values():
        if fmt.matches(keys):
            return fmt
    raise UserError(f"'{next(iter(keys))}' is not a LoRA key; pass a {', '.join(FORMATS)} LoRA file")


register(DIFFUSERS)
register(KOHYA)
register(PEFT)  # last: any file with lora_A keys matches it

__all__ = ["ADAPTER_METADATA_KEY", "COMPONENTS", "DIFFUSERS", "FORMATS", "KOHYA", "PEFT", "DiffusersFormat",
           "KohyaFormat", "LoraFormat", "LoraLayer", "PeftFormat", "detect", "format_named", "kohya_name_to_path",
           "parse_formats", "register"]
