"""LoRA files: write them, read them, load several into a pipeline, turn them into weight deltas.

The file formats themselves (diffusers, kohya, peft) live in :mod:`difflora.formats`, one reader /
writer each, registered by name. This module is the front every caller uses: it collects the LoRA
layers of peft-injected models into the normalised view ``{"<component>.<module path>": LoraLayer}``,
writes that view in the formats asked for, reads any file back into it, and loads files into
pipelines.

Writers never rely on a model's config to get the scale right: they read each peft layer's actual
``scaling`` (and DoRA magnitude) and record it, so rsLoRA, ``rank_pattern``, ``alpha_pattern`` and
DoRA survive every format.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from difflora.errors import UserError
from difflora.families import family_named
from difflora.formats import (
    ADAPTER_METADATA_KEY,
    COMPONENTS,
    DIFFUSERS,
    KOHYA,
    PEFT,
    LoraFormat,
    LoraLayer,
    detect,
    format_named,
    kohya_name_to_path,
    parse_formats,
)
from difflora.formats.base import canonical_te_path, strip_wrappers
from difflora.formats.diffusers import MAGNITUDE_KEY, peft_magnitude
from difflora.formats.diffusers import WEIGHT_NAME as LORA_WEIGHT_NAME
from difflora.formats.kohya import WEIGHT_NAME as KOHYA_WEIGHT_NAME
from difflora.formats.peft import WEIGHT_NAME as PEFT_WEIGHT_NAME

# ----------------------------------------------------------------------------------------------
# Collecting LoRA layers from peft-wrapped models
# ----------------------------------------------------------------------------------------------


def _pick_adapter(layer: Any, adapter_name: str | None) -> str:
    names = list(layer.lora_A.keys())
    if adapter_name is not None:
        if adapter_name not in names:
            raise UserError(f"adapter '{adapter_name}' not found (model has {names}); pass one of those names")
        return adapter_name
    if len(names) == 1:
        return names[0]
    active = [a for a in getattr(layer, "active_adapters", []) if a in names]
    return active[0] if active else names[0]


def collect_lora_layers(
    model: nn.Module, component: str, adapter_name: str | None = None
) -> dict[str, LoraLayer]:
    """The LoRA pairs of a peft-wrapped model, keyed ``<component>.<canonical module path>``.

    Reads each layer's own ``scaling`` so any peft configuration (rsLoRA, patterns) is captured,
    and DoRA's magnitude vector where the layer has one. Linear and conv layers alike: a conv
    layer's factors are 4-D (``down`` ``(r, in, kh, kw)``, ``up`` ``(out, r, 1, 1)``).
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    out: dict[str, LoraLayer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLayer) or not len(module.lora_A):
            continue
        adapter = _pick_adapter(module, adapter_name)
        magnitude = None
        if getattr(module, "use_dora", {}).get(adapter, False):
            magnitude = module.lora_magnitude_vector[adapter].weight.detach().reshape(-1)
        path = strip_wrappers(name)
        if component != "unet":
            path = canonical_te_path(path)
        out[f"{component}.{path}"] = LoraLayer(
            down=module.lora_A[adapter].weight.detach(),
            up=module.lora_B[adapter].weight.detach(),
            scale=float(module.scaling[adapter]),
            magnitude=magnitude,
        )
    return out


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _metadata_strings(extra: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (extra or {}).items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def output_names(formats: str | Collection[str]) -> tuple[str, ...]:
    """The output-folder entries that writing ``formats`` creates (for a job's ``Outputs``)."""
    return tuple(fmt.output_name for fmt in parse_formats(formats))


def save_lora(
    output_dir: str | os.PathLike,
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    *,
    formats: str | Sequence[str] = ("diffusers",),
    kohya: bool = False,
    alpha: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    adapter_name: str | None = None,
) -> list[Path]:
    """Save the LoRA layers of peft-wrapped models in ``formats``; returns the files written.

    ``formats`` are registered names (:data:`difflora.formats.FORMATS`, e.g. ``"diffusers,kohya"``);
    ``kohya=True`` adds kohya. The diffusers file (``pipe.load_lora_weights(dir)``) reproduces the
    in-memory model exactly; the kohya file is for A1111 / ComfyUI. ``alpha`` records that network
    alpha for every layer instead of each layer's own; ``lora_B`` is rescaled so the outputs do
    not change (kohya users often expect ``alpha = 1`` or ``alpha = rank``). ``metadata`` is
    added to every file's header (non-strings JSON-encoded). ``text_encoder_2`` marks an SDXL
    model (kohya names ``lora_te1_`` / ``lora_te2_``).
    """
    from difflora import __version__

    chosen = parse_formats(formats)
    if kohya and KOHYA not in chosen:
        chosen.append(KOHYA)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"'{output_dir}' is a file; pass a folder to save the LoRA into")
    layers: dict[str, LoraLayer] = {}
    modules: dict[str, list[str]] = {}
    for component, model in zip(COMPONENTS, (unet, text_encoder, text_encoder_2)):
        if model is not None:
            layers.update(collect_lora_layers(model, component, adapter_name))
            modules[component] = [strip_wrappers(n) for n, _ in model.named_modules()]
    if not layers:
        raise UserError("no LoRA layers found in the models given; add LoRA adapters before saving")
    if alpha is not None:
        if alpha <= 0:
            raise UserError(f"alpha must be positive, got {alpha}")
        layers = {k: v.rescaled(alpha / v.rank) for k, v in layers.items()}

    # SDXL is told by its UNet (size / crop conditioning), not by whether a second text encoder
    # was trained: a UNet-only SDXL LoRA is still an SDXL file.
    sdxl = text_encoder_2 is not None or getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"
    family = family_named("sdxl" if sdxl else "sd")
    ranks = sorted({v.rank for v in layers.values()})
    alphas = sorted({round(v.scale * v.rank, 6) for v in layers.values()})
    base_model = str(getattr(getattr(unet, "config", None), "_name_or_path", None) or "")
    if base_model.endswith(("/unet", "\\unet")):  # loaded with subfolder="unet": name the model folder
        base_model = base_model[: -len("unet") - 1]
    common = {
        "format": "pt",
        "difflora_version": __version__,
        "difflora_base_model": str(base_model),
        "difflora_rank": json.dumps(ranks[0] if len(ranks) == 1 else ranks),
        "difflora_alpha": json.dumps(alphas[0] if len(alphas) == 1 else alphas),
        "difflora_model_type": family.name,
        **_metadata_strings(metadata),
    }
    if any(v.magnitude is not None for v in layers.values()):
        common["difflora_dora"] = "true"

    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fmt in chosen:
        written += fmt.write(layers, output_dir, family=family, metadata=common, modules=modules)
    return written


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class LoraFile(NamedTuple):
    """A LoRA file as read from disk: tensors, format name, header (with sidecar entries) and path."""

    state: dict[str, torch.Tensor]
    format: str
    header: dict[str, str]
    file: Path


def _resolve_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise UserError(f"no LoRA file in '{path}'; expected {LORA_WEIGHT_NAME} or pass the file itself")
    if not path.is_file():
        raise UserError(f"LoRA file '{path}' does not exist; check the path")
    return path


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Load a LoRA file (or the LoRA file in a folder) with its format and header."""
    file = _resolve_file(path)
    header: dict[str, str] = {}
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                header = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable or truncated files are the user's to replace
        raise UserError(f"cannot read LoRA file '{file}' ({type(err).__name__}); re-save or re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{file}' is not a LoRA state dict; pass a .safetensors LoRA file")
    fmt = detect(list(state))
    return LoraFile(state, fmt.name, {**header, **fmt.sidecar(file)}, file)


def detect_format(keys: Iterable[str]) -> str:
    """The registered format name ('kohya', 'diffusers', 'peft'...) from the key names alone."""
    return detect(list(keys)).name


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Load a LoRA file (or the LoRA file in a folder) -> (state dict, format name)."""
    lora = read_lora_file(path)
    return lora.state, lora.format


def read_lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header of a LoRA file (difflora_*, ss_*, lora_adapter_metadata...)."""
    return read_lora_file(path).header


def lora_deltas(
    source: Mapping[str, torch.Tensor] | str | os.PathLike,
    base_modules: Mapping[str, Iterable[str]] | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, LoraLayer]:
    """Normalise any LoRA (path or state dict) to ``{"<component>.<module path>": LoraLayer}``.

    ``LoraLayer.delta()`` is the dense ``scale * up @ down`` to add to the base weight. Keys are
    canonical names, e.g. ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` and
    ``text_encoder.text_model.encoder.layers.3.self_attn.q_proj``. Scales come from ``.alpha``
    tensors (kohya), the ``lora_adapter_metadata`` header (diffusers; pass the header as
    ``metadata`` when giving a state dict) or ``adapter_config.json`` beside a peft file; missing
    information means scale 1, as in diffusers. Kohya names are split back into module paths with
    ``base_modules`` (``{"unet": unet_module_names, "text_encoder": ...}``) when given, else with a
    table of the multi-word names diffusers, transformers and the original UNet use.
    """
    if isinstance(source, Mapping):
        state, fmt, header = dict(source), detect(list(source)), dict(metadata or {})
    else:
        lora = read_lora_file(source)
        state, fmt, header = lora.state, format_named(lora.format), lora.header
    modules = {c: list(names) for c, names in base_modules.items()} if base_modules is not None else None
    return fmt.read(state, header, modules=modules)


# ----------------------------------------------------------------------------------------------
# Loading into a pipeline
# ----------------------------------------------------------------------------------------------


def live_path(model: nn.Module, path: str) -> str:
    """Canonical module path -> the name it has in ``model`` (recent transformers drop ``text_model.``)."""
    if path.startswith("text_model.") and not hasattr(model, "text_model"):
        return path[len("text_model."):]
    return path


def module_names(pipe: Any) -> dict[str, list[str]]:
    """``{component: module names}`` of a pipeline, the ``base_modules`` that :func:`lora_deltas` takes."""
    return {c: [n for n, _ in getattr(pipe, c).named_modules()] for c in COMPONENTS
            if getattr(pipe, c, None) is not None}


def check_fits(layers: Mapping[str, LoraLayer], pipe: Any, source: str = "LoRA") -> None:
    """Raise a UserError naming the first layer of ``layers`` that the pipeline cannot take."""
    for key in sorted(layers):
        layer = layers[key]
        component, _, path = key.partition(".")
        model = getattr(pipe, component, None)
        if model is None:
            raise UserError(f"{source} has layer '{key}' but the pipeline has no {component}; "
                            "use a LoRA trained for this kind of model")
        try:
            module = model.get_submodule(live_path(model, path))
        except AttributeError:
            raise UserError(f"{source} does not fit the base model: layer '{key}' does not exist in it; "
                            "use a LoRA trained on this base model") from None
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None or weight.dim() not in (2, 4):
            raise UserError(f"{source}: layer '{key}' is not a linear or conv layer in the base model; "
                            "use a LoRA trained on this base model")
        down, up = layer.down, layer.up
        ok = (down.dim() == weight.dim() and up.shape[1] == down.shape[0] and up.shape[0] == weight.shape[0]
              and down.shape[1] == weight.shape[1]
              and (weight.dim() == 2 or tuple(down.shape[2:]) == tuple(weight.shape[2:])))
        if not ok:
            raise UserError(
                f"{source} does not fit the base model: layer '{key}' has weight {tuple(weight.shape)} but the "
                f"LoRA has down {tuple(down.shape)} / up {tuple(up.shape)}; use a LoRA trained on this base model"
            )


def _adapter_name(file: Path, taken: set[str]) -> str:
    generic = (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, PEFT_WEIGHT_NAME)
    stem = re.sub(r"[^A-Za-z0-9_]", "_", file.parent.name if file.name in generic else file.stem) or "lora"
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    return name


def _diffusers_state(layers: Mapping[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """A header-free diffusers state dict of ``layers`` (each scale folded into ``lora_B``)."""
    state: dict[str, torch.Tensor] = {}
    for key, layer in layers.items():
        state[f"{key}.lora_A.weight"] = layer.down
        state[f"{key}.lora_B.weight"] = layer.up * layer.scale
        if layer.magnitude is not None:
            state[f"{key}.{MAGNITUDE_KEY}"] = peft_magnitude(layer)
    return state


def apply_loras(pipe: Any, loras: list[tuple[str | os.PathLike, float]]) -> list[str]:
    """Load several LoRA files (any registered format) into ``pipe`` with one weight each.

    Every file is read and checked against the pipeline first, so a LoRA for another base model
    fails with the name of the first layer that does not fit, before anything is loaded. Each
    file becomes a named adapter (returned, in order) and ``pipe.set_adapters`` activates them
    together, so the layer computes ``W0 + sum_i weight_i * delta_W_i``.
    """
    if not loras:
        return []
    names_in_pipe = module_names(pipe)
    prepared = []
    for path, weight in loras:
        lora = read_lora_file(path)
        layers = format_named(lora.format).read(lora.state, lora.header, modules=names_in_pipe)
        check_fits(layers, pipe, source=f"LoRA '{lora.file}'")
        prepared.append((lora.file, layers, float(weight)))

    taken = set()
    if hasattr(pipe, "get_list_adapters"):
        for names in pipe.get_list_adapters().values():
            taken.update(names)
    adapters: list[str] = []
    for file, layers, _ in prepared:
        name = _adapter_name(file, taken)
        taken.add(name)
        # Every format goes through the normalised view, so diffusers sees one layout it knows.
        pipe.load_lora_weights(_diffusers_state(layers), adapter_name=name)
        adapters.append(name)
    pipe.set_adapters(adapters, adapter_weights=[w for *_, w in prepared])
    return adapters


__all__ = ["ADAPTER_METADATA_KEY", "COMPONENTS", "DIFFUSERS", "KOHYA", "KOHYA_WEIGHT_NAME", "LORA_WEIGHT_NAME",
           "PEFT", "PEFT_WEIGHT_NAME", "LoraFile", "LoraFormat", "LoraLayer", "apply_loras", "check_fits",
           "collect_lora_layers", "detect_format", "kohya_name_to_path", "live_path", "lora_deltas",
           "module_names", "output_names", "read_lora", "read_lora_file", "read_lora_metadata", "save_lora"]
