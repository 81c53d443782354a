"""The peft layout: ``PeftModel.save_pretrained`` folders (``adapter_model.safetensors`` + ``adapter_config.json``).

One folder holds one model's adapter, so a LoRA spanning several components is written as
``peft/<component>/`` folders, each loadable with ``PeftModel.from_pretrained(component_model, folder)``.
Keys are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (and
``.lora_magnitude_vector`` for DoRA) under the module names of the model itself; the scale comes
from ``adapter_config.json``. Files carry no component: ours record it in the header
(``difflora_component``); for others, text-model paths go to ``text_encoder`` and the rest to ``unet``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from difflora.formats.base import (
    LoraFormat,
    LoraLayer,
    by_component,
    canonical_te_path,
    group_tensors,
    guess_component,
    lora_config,
    make_layer,
    scale_from_config,
    strip_wrappers,
)
from difflora.formats.diffusers import peft_magnitude
from difflora.output_dir import atomic_save_safetensors, atomic_write_text

WEIGHT_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FOLDER_NAME = "peft"
COMPONENT_KEY = "difflora_component"
_CONFIG_HEADER = "adapter_config"  # where :meth:`PeftFormat.sidecar` puts the config text
_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude",
             ".lora_magnitude_vector.weight": "magnitude"}


class PeftFormat(LoraFormat):
    name = "peft"
    output_name = FOLDER_NAME
    description = "peft/<component>/ adapter folders, for PeftModel.from_pretrained"

    def matches(self, keys: Collection[str]) -> bool:
        return any(".lora_A." in k or ".lora_B." in k for k in keys)

    def write(self, layers: Mapping[str, LoraLayer], folder: Path, *, family: Any, metadata: Mapping[str, str],
              modules: Mapping[str, Collection[str]] | None = None) -> list[Path]:
        written = []
        for component, part in by_component(layers).items():
            live = set(modules.get(component, ())) if modules else set()
            sub = folder / FOLDER_NAME / component
            sub.mkdir(parents=True, exist_ok=True)
            tensors: dict[str, torch.Tensor] = {}
            for key, layer in part.items():
                path = key[len(component) + 1:]
                if live and path not in live and path.removeprefix("text_model.") in live:
                    path = path.removeprefix("text_model.")  # this transformers has no text_model wrapper
                tensors[f"base_model.model.{path}.lora_A.weight"] = layer.down
                tensors[f"base_model.model.{path}.lora_B.weight"] = layer.up
                if layer.magnitude is not None:
                    tensors[f"base_model.model.{path}.lora_magnitude_vector"] = peft_magnitude(layer)
            config = {"peft_type": "LORA", "task_type": None, "bias": "none", "fan_in_fan_out": False,
                      "modules_to_save": None, "base_model_name_or_path": metadata.get("difflora_base_model"),
                      **lora_config(part, component)}
            atomic_save_safetensors(sub / WEIGHT_NAME, tensors, {**metadata, COMPONENT_KEY: component})
            atomic_write_text(sub / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
            written += [sub / WEIGHT_NAME, sub / CONFIG_NAME]
        return written

    def read(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
             modules: Mapping[str, Collection[str]] | None = None) -> dict[str, LoraLayer]:
        config = json.loads(metadata[_CONFIG_HEADER]) if _CONFIG_HEADER in metadata else None
        out: dict[str, LoraLayer] = {}
        for name, parts in group_tensors(tensors, _SUFFIXES).items():
            path = strip_wrappers(name)
            component = metadata.get(COMPONENT_KEY) or guess_component(path)
            if component != "unet":
                path = canonical_te_path(path)
            scale = None
            if config is not None and "down" in parts:
                scale = scale_from_config(config, path.removeprefix("text_model."), int(parts["down"].shape[0]))
            out[f"{component}.{path}"] = make_layer(name, parts, scale)
        return out

    def sidecar(self, file: Path) -> dict[str, str]:
        config = file.parent / CONFIG_NAME
        return {_CONFIG_HEADER: config.read_text(encoding="utf-8")} if config.is_file() else {}


PEFT = PeftFormat()
