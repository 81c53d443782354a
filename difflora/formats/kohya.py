"""The kohya layout: what A1111, ComfyUI, kohya sd-scripts (and diffusers) load.

Keys are ``<prefix><module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (scale
``alpha / rank``), prefix ``lora_unet_`` for the UNet and, for the text encoders, ``lora_te_`` (SD)
or ``lora_te1_`` / ``lora_te2_`` (SDXL); the family object knows which. Module names follow the
model kohya's trainer itself uses:

* SD 1.x / 2.x: the diffusers UNet (``lora_unet_down_blocks_0_attentions_0_proj_in``).
* SDXL: the original (ldm / sgm) UNet (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
  ``lora_unet_output_blocks_2_2_conv`` for an upsampler). sd-scripts only loads those for SDXL;
  ComfyUI, A1111 and diffusers accept both spellings.

Text encoders keep transformers' names (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``).
A conv LoRA has a 4-D ``lora_down`` ``(r, in, kh, kw)`` and ``lora_up`` ``(out, r, 1, 1)``. DoRA's
magnitude is ``.dora_scale``, shaped ``(out, 1)`` (``(out, 1, 1, 1)`` for a conv): ComfyUI's loader
takes a ``dora_scale`` whose first dimension equals the weight's output channels as the per-output
magnitude (LyCORIS ``wd_on_out``), which is what peft trains; the older ``(1, in)`` layout is a
per-input-column decomposition that peft cannot express, so it is refused when read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from difflora.errors import UserError
from difflora.formats.base import LoraFormat, LoraLayer, canonical_te_path, group_tensors, make_layer
from difflora.output_dir import atomic_save_safetensors

logger = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
_COMPONENT_OF = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".dora_scale": "dora"}

# ----------------------------------------------------------------------------------------------
# Splitting flat names back into module paths
# ----------------------------------------------------------------------------------------------

# Multi-word names in diffusers / transformers / ldm module paths, so a kohya name (all dots turned
# into underscores) can be split back without the model at hand. Longest first.
_COMPOUNDS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj",
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
        "text_projection", "token_embedding", "position_embedding", "layer_norm1", "layer_norm2",
        "add_q_proj", "add_out_proj",
        # the original (ldm / sgm) UNet
        "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "time_embed", "label_emb",
    },
    key=lambda s: -s.count("_"),
)


def kohya_name_to_path(name: str) -> str:
    """``down_blocks_0_attentions_1_proj_in`` -> ``down_blocks.0.attentions.1.proj_in`` (no model needed)."""
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
# diffusers <-> original (ldm / sgm) UNet names
# ----------------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)")
_LDM_MARKERS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")


@dataclass(frozen=True)
class UnetLayout:
    """Block structure of a UNet: how many resnets per level, which levels resample or attend.

    ``down``: per level (resnets, has a downsampler); ``up``: per level (resnets, has attentions,
    has an upsampler). That is all it takes to number the original UNet's ``input_blocks`` /
    ``output_blocks``.
    """

    down: tuple[tuple[int, bool], ...]
    up: tuple[tuple[int, bool, bool], ...]

    @classmethod
    def of(cls, modules: Iterable[str]) -> UnetLayout | None:
        """The layout of a diffusers UNet from its module names (None: not a UNet2DConditionModel)."""
        count: dict[tuple[str, int, str], int] = {}
        for name in modules:
            m = _BLOCK.match(name)
            if m:
                key = (m.group(1), int(m.group(2)), m.group(3))
                count[key] = max(count.get(key, 0), int(m.group(4)) + 1)
        levels = {(side, x) for side, x, _ in count}
        n_down = 1 + max((x for side, x in levels if side == "down_blocks"), default=-1)
        n_up = 1 + max((x for side, x in levels if side == "up_blocks"), default=-1)
        if not n_down or not n_up:
            return None
        down = tuple((count.get(("down_blocks", x, "resnets"), 0), ("down_blocks", x, "downsamplers") in count)
                     for x in range(n_down))
        up = tuple((count.get(("up_blocks", x, "resnets"), 0), ("up_blocks", x, "attentions") in count,
                    ("up_blocks", x, "upsamplers") in count) for x in range(n_up))
        return cls(down, up)

    @cached_property
    def blocks(self) -> dict[str, str]:
        """diffusers block path -> original block path."""
        table: dict[str, str] = {}
        n = 1  # input_blocks.0 is conv_in
        for x, (resnets, downsample) in enumerate(self.down):
            for i in range(resnets):
                table[f"down_blocks.{x}.resnets.{i}"] = f"input_blocks.{n}.0"
                table[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{n}.1"
                n += 1
            if downsample:
                table[f"down_blocks.{x}.downsamplers.0"] = f"input_blocks.{n}.0"
                n += 1
        table.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                      "mid_block.resnets.1": "middle_block.2"})
        n = 0
        for x, (resnets, attends, upsample) in enumerate(self.up):
            for i in range(resnets):
                table[f"up_blocks.{x}.resnets.{i}"] = f"output_blocks.{n}.0"
                table[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{n}.1"
                if upsample and i == resnets - 1:
                    table[f"up_blocks.{x}.upsamplers.0"] = f"output_blocks.{n}.{2 if attends else 1}"
                n += 1
        return table

    @cached_property
    def _ldm_blocks(self) -> dict[str, str]:
        return {v: k for k, v in self.blocks.items()}

    def to_ldm(self, path: str) -> str | None:
        """``down_blocks.1.resnets.0.conv1`` -> ``input_blocks.4.0.in_layers.2`` (None: no such module there)."""
        if path in _TOP:
            return _TOP[path]
        parts = path.split(".")
        size = 3 if parts[0] == "mid_block" else 4
        block = self.blocks.get(".".join(parts[:size]))
        if block is None or len(parts) <= size:
            return None
        rest = _rename_inside(parts[size - 2], parts[size:], to_ldm=True)
        return None if rest is None else f"{block}.{rest}"

    def from_ldm(self, path: str) -> str | None:
        """The inverse of :meth:`to_ldm`."""
        for diffusers_name, ldm in _TOP.items():
            if path == ldm:
                return diffusers_name
        parts = path.split(".")
        size = 2 if parts[0] == "middle_block" else 3
        block = self._ldm_blocks.get(".".join(parts[:size]))
        if block is None or len(parts) <= size:
            return None
        rest = _rename_inside(block.split(".")[-2], parts[size:], to_ldm=False)
        return None if rest is None else f"{block}.{rest}"


def _rename_inside(kind: str, rest: list[str], *, to_ldm: bool) -> str | None:
    """The module path inside one block, renamed between the two UNets (attentions keep theirs)."""
    tail = ".".join(rest)
    if kind == "attentions":
        return tail
    table = {"resnets": _RESNET, "downsamplers": {"conv": "op"}, "upsamplers": {"conv": "conv"}}[kind]
    if not to_ldm:
        table = {v: k for k, v in table.items()}
    return table.get(tail)


# The SDXL base UNet, for reading original-UNet names without the model at hand.
SDXL_LAYOUT = UnetLayout(down=((2, True), (2, True), (2, False)), up=((3, True, True), (3, True, True),
                                                                       (3, False, False)))


def uses_ldm_names(family: Any) -> bool:
    """Whether kohya's trainer names this family's UNet modules after the original UNet (SDXL does)."""
    return str(getattr(family, "kohya_base_model_version", "")).startswith("sdxl")


# ----------------------------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------------------------


class KohyaFormat(LoraFormat):
    name = "kohya"
    output_name = WEIGHT_NAME
    description = "pytorch_lora_weights_kohya.safetensors, for A1111 / ComfyUI / kohya sd-scripts"

    def matches(self, keys: Collection[str]) -> bool:
        return bool(keys) and all(k.startswith(PREFIXES) for k in keys)

    def unet_name(self, path: str, family: Any, layout: UnetLayout | None) -> str:
        """The flat kohya name of a UNet module (without ``lora_unet_``)."""
        if uses_ldm_names(family):
            ldm = (layout or SDXL_LAYOUT).to_ldm(path)
            if ldm is not None:
                path = ldm
            else:
                logger.warning("%s has no original-UNet name; kohya sd-scripts will not load it", path)
        return path.replace(".", "_")

    def write(self, layers: Mapping[str, LoraLayer], folder: Path, *, family: Any, metadata: Mapping[str, str],
              modules: Mapping[str, Collection[str]] | None = None) -> list[Path]:
        layout = UnetLayout.of(modules["unet"]) if modules and "unet" in modules else None
        tensors: dict[str, torch.Tensor] = {}
        for key, layer in layers.items():
            component, _, path = key.partition(".")
            flat = self.unet_name(path, family, layout) if component == "unet" else path.replace(".", "_")
            name = family.kohya_prefix(component) + flat
            tensors[f"{name}.lora_down.weight"] = layer.down
            tensors[f"{name}.lora_up.weight"] = layer.up
            tensors[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
            if layer.magnitude is not None:
                tensors[f"{name}.dora_scale"] = layer.magnitude.reshape(-1, *[1] * (layer.up.dim() - 1))
        ranks = sorted({v.rank for v in layers.values()})
        alphas = sorted({round(v.scale * v.rank, 6) for v in layers.values()})
        header = {**metadata, "ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
                  "ss_network_alpha": str(alphas[-1]), "ss_base_model_version": family.kohya_base_model_version}
        convs = [v for v in layers.values() if v.is_conv and v.down.shape[-1] > 1]
        if convs:  # kohya's LoCon-style 3x3 conv layers
            header["ss_network_args"] = json.dumps({"conv_dim": str(max(v.rank for v in convs)),
                                                    "conv_alpha": str(max(v.scale * v.rank for v in convs))})
        path = folder / WEIGHT_NAME
        atomic_save_safetensors(path, tensors, header)
        return [path]

    def read(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
             modules: Mapping[str, Collection[str]] | None = None) -> dict[str, LoraLayer]:
        lookup: dict[str, dict[str, str]] = {}
        layout = None
        for component, names in (modules or {}).items():
            canon = [n if component == "unet" else canonical_te_path(n) for n in names]
            lookup[component] = {n.replace(".", "_"): n for n in canon}
            if component == "unet":
                layout = UnetLayout.of(names)
                if layout is not None:
                    for n in canon:
                        ldm = layout.to_ldm(n)
                        if ldm is not None:
                            lookup[component][ldm.replace(".", "_")] = n
        out: dict[str, LoraLayer] = {}
        for name, parts in group_tensors(tensors, _SUFFIXES).items():
            prefix = next(p for p in PREFIXES if name.startswith(p))
            component = _COMPONENT_OF[prefix]
            flat = name[len(prefix):]
            path = lookup.get(component, {}).get(flat)
            if path is None:
                path = kohya_name_to_path(flat)
                if component == "unet" and flat.startswith(_LDM_MARKERS):
                    path = (layout or SDXL_LAYOUT).from_ldm(path) or path
            if "dora" in parts:
                parts = {**parts, "magnitude": _magnitude(name, parts)}
            out[f"{component}.{path}"] = make_layer(name, parts)
        return out


def _magnitude(name: str, parts: Mapping[str, Any]) -> torch.Tensor:
    dora, up = parts["dora"], parts.get("up")
    if up is not None and dora.shape[0] != up.shape[0]:
        raise UserError(f"'{name}.dora_scale' has shape {tuple(dora.shape)}: a per-input-column DoRA (LyCORIS "
                        "without wd_on_out), which diffusers and peft cannot express; re-train it with the "
                        "magnitude on the output axis")
    return dora


KOHYA = KohyaFormat()
