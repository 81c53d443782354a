"""What every file format shares: the normalised view of a LoRA and the format interface.

A LoRA in memory is ``{"<component>.<module path>": LoraLayer}``: component ``unet``,
``text_encoder`` or ``text_encoder_2``, the UNet path as in ``UNet2DConditionModel.named_modules()``
and the text-encoder path in the classic transformers spelling with ``text_model.``
(``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``), whatever the installed
transformers calls it internally. Formats only translate names and tensor layouts; the numbers
are the same in all of them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from difflora.errors import UserError

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm")


@dataclass
class LoraLayer:
    """One LoRA pair in file-independent form: ``delta_W = scale * up @ down``.

    ``magnitude`` is DoRA's per-output-channel magnitude (shape ``(out,)``): the layer's weight
    becomes ``magnitude * V / ||V||`` row by row, with ``V = W0 + scale * up @ down``.
    """

    down: torch.Tensor  # (r, in) or, for a conv, (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float
    magnitude: torch.Tensor | None = None  # (out,): DoRA only

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def rescaled(self, scale: float) -> LoraLayer:
        """The same update stored with another scale (``up`` absorbs the difference)."""
        return replace(self, up=self.up * (self.scale / scale), scale=scale)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight update, shaped like the base layer's weight.

        A DoRA layer's update depends on the base weight (it is renormalised), so it needs ``base``.
        """
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            update = self.scale * (up @ down)
        else:  # conv: up is 1x1, so the product is a per-pixel matrix product over the rank
            update = self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)
        if self.magnitude is None:
            return update
        if base is None:
            raise UserError("a DoRA layer's weight update depends on the base weight; merge it with the model "
                            "at hand (pass base=) or save it without DoRA")
        w0 = base.float()
        merged = w0 + update
        norm = merged.flatten(1).norm(dim=1).view(-1, *[1] * (merged.dim() - 1))
        return self.magnitude.float().view_as(norm) / norm * merged - w0


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def canonical_te_path(path: str) -> str:
    """Text-encoder module path with the ``text_model.`` prefix that every LoRA tool expects."""
    if path.startswith(TEXT_MODEL_PARTS):
        return "text_model." + path
    return path


def strip_wrappers(name: str) -> str:
    """Drop the prefix a ``PeftModel`` wrapper adds to module names."""
    return name.removeprefix("base_model.model.")


def guess_component(path: str) -> str:
    """Component of a path from a file that names none (peft): text-model paths are a text encoder's."""
    return "text_encoder" if path.startswith(("text_model.", *TEXT_MODEL_PARTS)) else "unet"


def by_component(layers: Mapping[str, LoraLayer]) -> dict[str, dict[str, LoraLayer]]:
    """``{component: {key: layer}}`` in :data:`COMPONENTS` order, components without layers left out."""
    out: dict[str, dict[str, LoraLayer]] = {}
    for component in COMPONENTS:
        part = {k: v for k, v in layers.items() if k.startswith(component + ".")}
        if part:
            out[component] = part
    return out


# ----------------------------------------------------------------------------------------------
# Scales as peft configs state them
# ----------------------------------------------------------------------------------------------


def _most_common(values: Iterable[Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.__getitem__)


def lora_config(layers: Mapping[str, LoraLayer], component: str) -> dict[str, Any]:
    """peft ``LoraConfig`` arguments that rebuild exactly these layers (ranks, scales, DoRA)."""
    names, ranks, alphas, dora = [], {}, {}, set()
    for key, layer in layers.items():
        # Suffix names without ``text_model.`` match the text encoder in every transformers version.
        path = key[len(component) + 1:].removeprefix("text_model.")
        names.append(path)
        ranks[path] = layer.rank
        alphas[path] = layer.scale * layer.rank  # stored as plain alpha/r: exact for rsLoRA too
        dora.add(layer.magnitude is not None)
    if len(dora) > 1:
        raise UserError(f"{component} mixes DoRA and plain LoRA layers, which one peft config cannot describe; "
                        "train all its layers with the same --use_dora setting")
    r = int(_most_common(ranks.values()))
    alpha = _most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(names),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "use_rslora": False,
        "use_dora": dora == {True},
        "lora_dropout": 0.0,
        "init_lora_weights": True,
    }


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    # Same matching rule as peft: the pattern must match a dotted suffix of the module name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def scale_from_config(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The scale peft gives ``module`` under ``config`` (alpha / rank patterns, rsLoRA)."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    cfg_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if cfg_rank != rank:
        logger.warning("%s: rank %s in the file, %s in its config; using the file's", module, rank, cfg_rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ----------------------------------------------------------------------------------------------
# Reading helpers
# ----------------------------------------------------------------------------------------------


def group_tensors(tensors: Mapping[str, torch.Tensor], suffixes: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``{module name: {role: tensor}}`` from keys ``<module name><suffix>`` (roles: down, up, alpha...)."""
    ordered = sorted(suffixes.items(), key=lambda kv: -len(kv[0]))
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        for suffix, role in ordered:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            logger.warning("ignoring non-LoRA key %s", key)
    return groups


def make_layer(name: str, parts: Mapping[str, Any], scale: float | None = None) -> LoraLayer:
    """A :class:`LoraLayer` from grouped tensors; ``scale`` defaults to ``alpha / rank`` or 1."""
    if "down" not in parts or "up" not in parts:
        raise UserError(f"LoRA layer '{name}' has only one of its two matrices; the file is incomplete")
    down, up = parts["down"], parts["up"]
    if scale is None:
        scale = float(parts["alpha"]) / int(down.shape[0]) if "alpha" in parts else 1.0
    magnitude = parts.get("magnitude")
    if magnitude is not None:
        if magnitude.numel() != up.shape[0]:
            raise UserError(f"LoRA layer '{name}': DoRA magnitude has shape {tuple(magnitude.shape)}, expected "
                            f"{up.shape[0]} values (one per output channel); the file is not a DoRA file this "
                            "reader knows")
        magnitude = magnitude.reshape(-1)
    return LoraLayer(down=down, up=up, scale=scale, magnitude=magnitude)


# ----------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------


class LoraFormat:
    """One on-disk layout of a LoRA: how to recognise, write and read it.

    ``output_name`` is the entry :meth:`write` creates in an output folder (a file or a folder).
    ``modules`` (writing and reading) maps each component to the module names of the live model,
    for formats whose names depend on the model's layout (kohya's SDXL names).
    """

    name: str = ""
    output_name: str = ""
    description: str = ""

    def matches(self, keys: Collection[str]) -> bool:
        """Whether a file with these tensor keys is in this format."""
        raise NotImplementedError

    def write(self, layers: Mapping[str, LoraLayer], folder: Path, *, family: Any, metadata: Mapping[str, str],
              modules: Mapping[str, Collection[str]] | None = None) -> list[Path]:
        """Write ``layers`` into ``folder`` (atomically); return the paths written."""
        raise NotImplementedError

    def read(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
             modules: Mapping[str, Collection[str]] | None = None) -> dict[str, LoraLayer]:
        """The normalised view of a file's tensors and header."""
        raise NotImplementedError

    def sidecar(self, file: Path) -> dict[str, str]:
        """Header entries that live in files beside ``file`` (peft's ``adapter_config.json``)."""
        return {}
