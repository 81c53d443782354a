"""The diffusers layout: what ``pipe.load_lora_weights`` reads and ``save_lora_weights`` writes.

Keys are ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` (component ``unet``,
``text_encoder`` or, for SDXL, ``text_encoder_2``); DoRA adds ``<component>.<module>.lora_magnitude_vector.weight``
in peft's own shape (``(out,)`` for a linear layer, ``(1, out, 1, 1)`` for a conv); a conv LoRA has
4-D factors (``lora_A`` ``(r, in, kh, kw)``, ``lora_B`` ``(out, r, 1, 1)``). The per-layer scale is not
in the tensors: it is stored as peft ``LoraConfig`` arguments in the safetensors header
(``lora_adapter_metadata``, one ``<component>.<argument>`` entry each), which diffusers reads.
Without that header the scale is 1. Older diffusers spellings (``.lora.down.weight``,
``.lora_linear_layer.down.weight``) are read too.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from difflora.formats.base import (
    COMPONENTS,
    LoraFormat,
    LoraLayer,
    by_component,
    canonical_te_path,
    group_tensors,
    lora_config,
    make_layer,
    scale_from_config,
)
from difflora.output_dir import atomic_save_safetensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the header key diffusers reads LoraConfig kwargs from
# DoRA's magnitude with the ``.weight`` of peft's DoRA module: peft's loader accepts it with or without
# (it appends the suffix when missing), transformers' text-encoder loader only with it.
MAGNITUDE_KEY = "lora_magnitude_vector.weight"

_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude", ".alpha": "alpha",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
}


def peft_magnitude(layer: LoraLayer) -> torch.Tensor:
    """DoRA's magnitude in the shape peft keeps it: ``(out,)``, or ``(1, out, 1, 1)`` for a conv."""
    assert layer.magnitude is not None
    return layer.magnitude.reshape(1, -1, 1, 1) if layer.is_conv else layer.magnitude.reshape(-1)


class DiffusersFormat(LoraFormat):
    name = "diffusers"
    output_name = WEIGHT_NAME
    description = "pytorch_lora_weights.safetensors, for pipe.load_lora_weights"

    def matches(self, keys: Collection[str]) -> bool:
        return any(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys)

    def encode(self, layers: Mapping[str, LoraLayer]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and header entries of ``layers`` (also used inside ED-LoRA's concept file)."""
        tensors: dict[str, torch.Tensor] = {}
        adapter: dict[str, Any] = {}
        for component, part in by_component(layers).items():
            for key, layer in part.items():
                tensors[f"{key}.lora_A.weight"] = layer.down
                tensors[f"{key}.lora_B.weight"] = layer.up
                if layer.magnitude is not None:
                    tensors[f"{key}.{MAGNITUDE_KEY}"] = peft_magnitude(layer)
            adapter.update({f"{component}.{k}": v for k, v in lora_config(part, component).items()})
        return tensors, {ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True)}

    def write(self, layers: Mapping[str, LoraLayer], folder: Path, *, family: Any, metadata: Mapping[str, str],
              modules: Mapping[str, Collection[str]] | None = None) -> list[Path]:
        tensors, header = self.encode(layers)
        path = folder / WEIGHT_NAME
        atomic_save_safetensors(path, tensors, {**metadata, **header})
        return [path]

    def read(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
             modules: Mapping[str, Collection[str]] | None = None) -> dict[str, LoraLayer]:
        adapter = json.loads(metadata[ADAPTER_METADATA_KEY]) if ADAPTER_METADATA_KEY in metadata else {}
        configs: dict[str, dict[str, Any]] = {}
        for key, value in adapter.items():
            component, _, arg = key.partition(".")
            configs.setdefault(component, {})[arg] = value
        out: dict[str, LoraLayer] = {}
        for name, parts in group_tensors(tensors, _SUFFIXES).items():
            component, _, path = name.partition(".")
            if component != "unet":
                path = canonical_te_path(path)
            scale = None
            if "alpha" not in parts and component in configs:
                scale = scale_from_config(configs[component], path.removeprefix("text_model."),
                                          int(parts["down"].shape[0]) if "down" in parts else 1)
            out[f"{component}.{path}"] = make_layer(name, parts, scale)
        return out


DIFFUSERS = DiffusersFormat()
