"""LoRA files: write them, read them, load several into a pipeline, turn them into weight deltas.

Three on-disk layouts exist for the same numbers and users meet all of them:

* **diffusers** (``pytorch_lora_weights.safetensors``): keys ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight`` (also ``text_encoder.`` and, for SDXL, ``text_encoder_2.``). The per-layer
  scale is not in the tensors: it is stored as peft ``LoraConfig`` arguments in the safetensors
  header (``lora_adapter_metadata``), which ``pipe.load_lora_weights`` reads. Without that header
  the scale is 1.
* **kohya** (``pytorch_lora_weights_kohya.safetensors``, what A1111 / ComfyUI load): keys
  ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, and
  ``lora_te_`` (SD) or ``lora_te1_`` / ``lora_te2_`` (SDXL) for the text encoders. The scale is
  ``alpha / rank`` per layer.
* **peft** (``adapter_model.safetensors`` from ``PeftModel.save_pretrained``): ``lora_A`` /
  ``lora_B`` keys without a component prefix (``base_model.model.`` is dropped); the scale comes
  from ``adapter_config.json`` beside the file.

Writers here never rely on a model's config to get the scale right: they read each peft layer's
actual ``scaling`` and record it, so rsLoRA, ``rank_pattern`` and ``alpha_pattern`` survive.

Module names used throughout (``lora_deltas`` keys, error messages) are
``<component>.<module path>`` with component ``unet``, ``text_encoder`` or ``text_encoder_2``,
the UNet path as in ``UNet2DConditionModel.named_modules()`` and the text-encoder path in the
classic transformers spelling with ``text_model.`` (``text_encoder.text_model.encoder.layers.0.
self_attn.q_proj``), whatever the installed transformers calls it internally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.errors import UserError
from difflora.families import family_named

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the header key diffusers reads LoraConfig kwargs from
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm")


@dataclass
class LoraLayer:
    """One LoRA pair in file-independent form: ``delta_W = scale * up @ down``."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense weight update, shaped like the base layer's weight."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return self.scale * (up @ down)
        # Conv: up is 1x1, so the product is a per-pixel matrix product over the rank.
        return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def _canonical_te_path(path: str) -> str:
    """Text-encoder module path with the ``text_model.`` prefix that every LoRA tool expects."""
    if path.startswith(_TEXT_MODEL_PARTS):
        return "text_model." + path
    return path


def _live_path(model: nn.Module, path: str) -> str:
    """Canonical module path -> the name it has in ``model`` (recent transformers drop ``text_model.``)."""
    if path.startswith("text_model.") and not hasattr(model, "text_model"):
        return path[len("text_model."):]
    return path


def _strip_wrappers(name: str) -> str:
    """Drop the prefixes a ``PeftModel`` wrapper adds to module names."""
    return name.removeprefix("base_model.model.")


# Multi-word names in diffusers / transformers module paths, so a kohya name (all dots turned into
# underscores) can be split back without the model at hand. Longest first.
_COMPOUNDS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj",
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
        "text_projection", "token_embedding", "position_embedding", "layer_norm1", "layer_norm2",
        "add_q_proj", "add_out_proj",
    },
    key=lambda s: -s.count("_"),
)


def kohya_name_to_path(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (no model needed)."""
    tokens = name.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for compound in _COMPOUNDS:
            n = compound.count("_") + 1
            if "_".join(tokens[i:i + n]) == compound:
                parts.append(compound)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


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

    Reads each layer's own ``scaling`` so any peft configuration (rsLoRA, patterns) is captured.
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    out: dict[str, LoraLayer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLayer) or not len(module.lora_A):
            continue
        adapter = _pick_adapter(module, adapter_name)
        if getattr(module, "use_dora", {}).get(adapter, False):
            logger.warning("%s uses DoRA; its magnitude vector is not saved", name)
        path = _strip_wrappers(name)
        if component != "unet":
            path = _canonical_te_path(path)
        out[f"{component}.{path}"] = LoraLayer(
            down=module.lora_A[adapter].weight.detach(),
            up=module.lora_B[adapter].weight.detach(),
            scale=float(module.scaling[adapter]),
        )
    return out


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that a crash never leaves a half-written file at ``path``."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _most_common(values: Iterable[float]) -> float:
    return Counter(values).most_common(1)[0][0]


def _adapter_config(layers: dict[str, LoraLayer], component: str) -> dict[str, Any]:
    """peft ``LoraConfig`` kwargs that rebuild exactly these layers (ranks and scales) in diffusers."""
    names, ranks, alphas = [], {}, {}
    for key, layer in layers.items():
        # Suffix names without ``text_model.`` match the text encoder in every transformers version.
        path = key[len(component) + 1:]
        if path.startswith("text_model."):
            path = path[len("text_model."):]
        names.append(path)
        ranks[path] = layer.rank
        alphas[path] = layer.scale * layer.rank  # stored as plain alpha/r: exact for rsLoRA too
    r = int(_most_common(ranks.values()))
    alpha = _most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(names),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
    }


def _metadata_strings(extra: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (extra or {}).items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def save_lora(
    output_dir: str | os.PathLike,
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    *,
    kohya: bool = False,
    alpha: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    adapter_name: str | None = None,
) -> list[Path]:
    """Save the LoRA layers of peft-wrapped models; returns the files written.

    Writes ``pytorch_lora_weights.safetensors`` (diffusers layout; ``pipe.load_lora_weights(dir)``
    reproduces the in-memory model exactly) and, with ``kohya=True``, also
    ``pytorch_lora_weights_kohya.safetensors`` for A1111 / ComfyUI. ``alpha`` records that network
    alpha for every layer instead of each layer's own; ``lora_B`` is rescaled so the outputs do
    not change (kohya users often expect ``alpha = 1`` or ``alpha = rank``). ``metadata`` is
    added to both files' headers (non-strings JSON-encoded). ``text_encoder_2`` marks an SDXL
    model (kohya names ``lora_te1_`` / ``lora_te2_``).
    """
    from difflora import __version__

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"'{output_dir}' is a file; pass a folder to save the LoRA into")
    layers: dict[str, LoraLayer] = {}
    for component, model in zip(COMPONENTS, (unet, text_encoder, text_encoder_2)):
        if model is not None:
            layers.update(collect_lora_layers(model, component, adapter_name))
    if not layers:
        raise UserError("no LoRA layers found in the models given; add LoRA adapters before saving")
    if alpha is not None:
        if alpha <= 0:
            raise UserError(f"alpha must be positive, got {alpha}")
        layers = {
            k: LoraLayer(v.down, v.up * (v.scale * v.rank / alpha), alpha / v.rank) for k, v in layers.items()
        }

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

    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, Any] = {}
    for component in COMPONENTS:
        part = {k: v for k, v in layers.items() if k.startswith(component + ".")}
        if not part:
            continue
        for key, layer in part.items():
            tensors[f"{key}.lora_A.weight"] = layer.down
            tensors[f"{key}.lora_B.weight"] = layer.up
        for k, v in _adapter_config(part, component).items():
            adapter_meta[f"{component}.{k}"] = v
    path = output_dir / LORA_WEIGHT_NAME
    _atomic_save(tensors, path, {**common, ADAPTER_METADATA_KEY: json.dumps(adapter_meta, sort_keys=True)})
    written.append(path)

    if kohya:
        tensors = {}
        for key, layer in layers.items():
            component, _, module = key.partition(".")
            name = family.kohya_prefix(component) + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = layer.down
            tensors[f"{name}.lora_up.weight"] = layer.up
            tensors[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
        kohya_meta = {**common, "ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
                      "ss_network_alpha": str(alphas[-1]),
                      "ss_base_model_version": family.kohya_base_model_version}
        path = output_dir / KOHYA_WEIGHT_NAME
        _atomic_save(tensors, path, kohya_meta)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


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


def detect_format(keys: Iterable[str]) -> str:
    """'kohya', 'diffusers' or 'peft' from the key names alone."""
    keys = list(keys)
    if not keys:
        raise UserError("the LoRA file holds no tensors; pass a LoRA saved by a trainer")
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys):
        return "diffusers"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise UserError(f"'{keys[0]}' is not a LoRA key; pass a diffusers, kohya or peft LoRA file")


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, dict[str, str], Path]:
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
    return state, detect_format(state.keys()), header, file


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Load a LoRA file (or the LoRA file in a folder) -> (state dict, 'diffusers'|'kohya'|'peft')."""
    state, fmt, _, _ = _read(path)
    return state, fmt


def read_lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header of a LoRA file (difflora_*, ss_*, lora_adapter_metadata...)."""
    return _read(path)[2]


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    # Same matching rule as peft: the pattern must match a dotted suffix of the module name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _scale_from_config(config: Mapping[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    cfg_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if cfg_rank != rank:
        logger.warning("%s: rank %s in the file, %s in its config; using the file's", module, rank, cfg_rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


_PAIR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)


def _guess_component(path: str) -> str:
    return "text_encoder" if path.startswith(("text_model.", *_TEXT_MODEL_PARTS)) else "unet"


def lora_deltas(
    source: Mapping[str, torch.Tensor] | str | os.PathLike,
    base_modules: Mapping[str, Iterable[str]] | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, LoraLayer]:
    """Normalise any LoRA (path or state dict) to ``{"<component>.<module path>": LoraLayer}``.

    ``LoraLayer.delta()`` is the dense ``scale * up @ down`` to add to the base weight. Keys are
    the canonical names described in the module docstring, e.g.
    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` and
    ``text_encoder.text_model.encoder.layers.3.self_attn.q_proj``. Scales come from
    ``.alpha`` tensors (kohya), the ``lora_adapter_metadata`` header (diffusers; pass the header
    as ``metadata`` when giving a state dict) or ``adapter_config.json`` beside a peft file;
    missing information means scale 1, as in diffusers. Kohya names are split back into module
    paths with ``base_modules`` (``{"unet": unet_module_names, "text_encoder": ...}``) when
    given, else with a table of the multi-word names diffusers and transformers use. peft
    files carry no component: paths starting ``text_model.``/``encoder.`` go to ``text_encoder``,
    the rest to ``unet``.
    """
    peft_config: dict[str, Any] | None = None
    if isinstance(source, Mapping):
        state, fmt, header = dict(source), detect_format(source.keys()), dict(metadata or {})
    else:
        state, fmt, header, file = _read(source)
        if fmt == "peft" and (file.parent / "adapter_config.json").is_file():
            peft_config = json.loads((file.parent / "adapter_config.json").read_text())
    adapter_meta = json.loads(header[ADAPTER_METADATA_KEY]) if ADAPTER_METADATA_KEY in header else {}

    # Find (down, up, alpha-or-None) per raw module name.
    raw: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            raw.setdefault(key[: -len(".alpha")], {})["alpha"] = float(tensor.item())
            continue
        for down_sfx, up_sfx in _PAIR_SUFFIXES:
            if key.endswith(down_sfx):
                raw.setdefault(key[: -len(down_sfx)], {})["down"] = tensor
                break
            if key.endswith(up_sfx):
                raw.setdefault(key[: -len(up_sfx)], {})["up"] = tensor
                break
        else:
            logger.warning("ignoring non-LoRA key %s", key)

    lookup: dict[str, dict[str, str]] = {}
    if fmt == "kohya" and base_modules is not None:
        for component, names in base_modules.items():
            canon = [n if component == "unet" else _canonical_te_path(n) for n in names]
            lookup[component] = {n.replace(".", "_"): n for n in canon}

    out: dict[str, LoraLayer] = {}
    for name, parts in raw.items():
        if "down" not in parts or "up" not in parts:
            raise UserError(f"LoRA layer '{name}' has only one of its two matrices; the file is incomplete")
        down, up = parts["down"], parts["up"]
        rank = int(down.shape[0])
        if fmt == "kohya":
            prefix = next(p for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_") if name.startswith(p))
            component = {"lora_unet_": "unet", "lora_te2_": "text_encoder_2"}.get(prefix, "text_encoder")
            flat = name[len(prefix):]
            path = lookup.get(component, {}).get(flat) or kohya_name_to_path(flat)
            scale = parts["alpha"] / rank if "alpha" in parts else 1.0
        else:
            if fmt == "diffusers":
                component, _, path = name.partition(".")
            else:
                path = _strip_wrappers(name)
                component = _guess_component(path)
            if component != "unet":
                path = _canonical_te_path(path)
            if "alpha" in parts:
                scale = parts["alpha"] / rank
            elif fmt == "diffusers" and any(k.startswith(component + ".") for k in adapter_meta):
                config = {k[len(component) + 1:]: v for k, v in adapter_meta.items()
                          if k.startswith(component + ".")}
                scale = _scale_from_config(config, path.removeprefix("text_model."), rank)
            elif peft_config is not None:
                scale = _scale_from_config(peft_config, path.removeprefix("text_model."), rank)
            else:
                scale = 1.0
        out[f"{component}.{path}"] = LoraLayer(down=down, up=up, scale=scale)
    return out


# ----------------------------------------------------------------------------------------------
# Loading into a pipeline
# ----------------------------------------------------------------------------------------------


def _base_layer(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


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
            module = _base_layer(model.get_submodule(_live_path(model, path)))
        except AttributeError:
            raise UserError(f"{source} does not fit the base model: layer '{key}' does not exist in it; "
                            "use a LoRA trained on this base model") from None
        weight = getattr(module, "weight", None)
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


def _module_names(pipe: Any) -> dict[str, list[str]]:
    return {c: [n for n, _ in getattr(pipe, c).named_modules()] for c in COMPONENTS
            if getattr(pipe, c, None) is not None}


def _adapter_name(file: Path, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", file.parent.name if file.name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME)
                  else file.stem) or "lora"
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    return name


def apply_loras(pipe: Any, loras: list[tuple[str | os.PathLike, float]]) -> list[str]:
    """Load several LoRA files (diffusers, kohya or peft) into ``pipe`` with one weight each.

    Every file is checked against the pipeline first, so a LoRA for another base model fails with
    the name of the first layer that does not fit, before anything is loaded. Each file becomes a
    named adapter (returned, in order) and ``pipe.set_adapters`` activates them together, so the
    layer computes ``W0 + sum_i weight_i * delta_W_i``.
    """
    if not loras:
        return []
    names_in_pipe = _module_names(pipe)
    prepared = []
    for path, weight in loras:
        state, fmt, header, file = _read(path)
        sgm = fmt == "kohya" and any(b in k for k in state for b in ("input_blocks", "output_blocks"))
        if not sgm:  # original-UNet (SGM) block names: diffusers renames them itself, so trust it
            check_fits(lora_deltas(state, names_in_pipe, metadata=header), pipe, source=f"LoRA '{file}'")
        prepared.append((file, fmt, float(weight)))

    taken = set()
    if hasattr(pipe, "get_list_adapters"):
        for names in pipe.get_list_adapters().values():
            taken.update(names)
    adapters: list[str] = []
    for file, fmt, _ in prepared:
        name = _adapter_name(file, taken)
        taken.add(name)
        if fmt == "peft":
            # diffusers wants component prefixes; rebuild them from our normalised view.
            layers = lora_deltas(file)
            state = {}
            for key, layer in layers.items():
                state[f"{key}.lora_A.weight"] = layer.down
                state[f"{key}.lora_B.weight"] = layer.up * layer.scale
            pipe.load_lora_weights(state, adapter_name=name)
        else:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        adapters.append(name)
    pipe.set_adapters(adapters, adapter_weights=[w for *_, w in prepared])
    return adapters
