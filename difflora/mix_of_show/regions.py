"""``difflora sample-regions``: regionally controlled sampling (Mix-of-Show).

A global prompt plus regions, each a box with its own prompt (and negative prompt). In every UNet
cross-attention layer, image positions inside a box attend to that region's prompt encoding and
all others to the global one: :class:`RegionAttnProcessor` wraps the model's own processor and
runs it once per prompt, then picks per position, so a box covering the whole image gives exactly
the sample of the region prompt. Later regions win where boxes overlap. With ED-LoRA concepts
(layer-wise tokens in the model's ``concepts.json``) every prompt is encoded once per
cross-attention layer and each layer reads its own encoding, inside and outside the boxes. An optional T2I-Adapter
(keypose / sketch condition image) steers the layout further. SD 1.x / 2.x and SDXL models: on SDXL
the regions replace the token states (both encoders'); the pooled embedding, which conditions the
whole image through the time embedding, is the global prompt's.

Writes ``image.png``, ``layout.png`` (boxes and labels over the image) and ``settings.json``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflora.config import check_device, check_image_size, config_to_dict, parse_config, read_text
from difflora.data import read_image
from difflora.errors import UserError
from difflora.families import Conditioning, ModelFamily, family_of_folder
from difflora.mix_of_show.edlora import (
    cross_attention_layers,
    install_layerwise,
    is_layerwise,
    layerwise_conditioning,
)
from difflora.output_dir import Outputs, atomic_save_image, atomic_write_text, output_job, prepare_output_dir

CONCEPTS_FILE = "concepts.json"


@dataclass
class Region:
    """A box in pixels (x0, y0, x1, y1; x to the right, y down) and its prompts."""

    box: tuple[float, float, float, float]
    prompt: str
    negative_prompt: str | None = None


def resolve_box(values: Any, width: int, height: int, what: str = "box") -> tuple[float, float, float, float]:
    """Fractions (all values in [0, 1]) or pixels -> pixels; refuse boxes outside the image or empty.

    ``values`` comes from a flag or a layout file, so anything but a list of 4 finite numbers is
    refused here (a NaN would pass every comparison below and crash the sampler later).
    """
    if (not isinstance(values, (list, tuple)) or len(values) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise UserError(f"{what} must be 4 numbers [x0, y0, x1, y1], got {values!r}")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{what} {list(values)} must hold finite numbers; write pixels or fractions in [0, 1]")
    values = list(values)
    x0, y0, x1, y1 = (float(v) for v in values)
    if max(x0, y0, x1, y1) <= 1.0:  # fractions of the image (a box of 1 pixel is never meant)
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    if min(x0, y0) < 0 or x1 > width or y1 > height:
        raise UserError(f"{what} {list(values)} lies outside the {width}x{height} image; use pixels within it "
                        "or fractions in [0, 1]")
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"{what} {list(values)} has zero area; write x0,y0,x1,y1 with x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def parse_region(text: str, width: int, height: int) -> Region:
    """``"x0,y0,x1,y1|PROMPT[|NEGATIVE]"`` -> :class:`Region` (pixels or fractions)."""
    parts = text.split("|")
    if len(parts) not in (2, 3) or not parts[1].strip():
        raise UserError(f"region {text!r} must be written 'x0,y0,x1,y1|prompt[|negative prompt]'")
    try:
        values = [float(v) for v in parts[0].split(",")]
    except ValueError:
        raise UserError(f"region {text!r}: the box must be 4 numbers x0,y0,x1,y1") from None
    box = resolve_box(values, width, height, what=f"region box '{parts[0]}'")
    return Region(box, parts[1].strip(), parts[2].strip() if len(parts) == 3 else None)


def box_mask(box: tuple[float, float, float, float], width: int, height: int, h: int, w: int) -> torch.Tensor:
    """(h*w,) float mask of the grid cells a pixel box covers at an h x w feature resolution."""
    x0, y0, x1, y1 = box
    r0, r1 = math.floor(y0 / height * h), max(math.ceil(y1 / height * h), math.floor(y0 / height * h) + 1)
    c0, c1 = math.floor(x0 / width * w), max(math.ceil(x1 / width * w), math.floor(x0 / width * w) + 1)
    mask = torch.zeros(h, w)
    mask[r0:r1, c0:c1] = 1.0
    return mask.flatten()


class RegionController:
    """The regions and their encodings, shared by every wrapped cross-attention processor."""

    def __init__(self, width: int, height: int, guidance: bool = True):
        self.width, self.height, self.guidance = width, height, guidance
        self.regions: list[tuple[Region, torch.Tensor, torch.Tensor]] = []  # region, positive, negative

    def add(self, region: Region, positive: torch.Tensor, negative: torch.Tensor) -> None:
        self.regions.append((region, positive, negative))

    def embeds(self, positive: torch.Tensor, negative: torch.Tensor, batch: int) -> torch.Tensor:
        """Match the pipeline's batch: [negatives, positives] with guidance, positives without."""
        if self.guidance:
            half = batch // 2
            return torch.cat([negative.expand(half, -1, -1), positive.expand(half, -1, -1)])
        return positive.expand(batch, -1, -1)

    def mask(self, region: Region, n: int) -> torch.Tensor:
        """Mask over the n query positions of a layer; its grid size follows from the image's aspect."""
        scale = math.sqrt(self.width * self.height / n)
        h = max(1, round(self.height / scale))
        w = n // h
        if h * w != n:
            raise RuntimeError(f"cannot map {n} positions onto a {self.width}x{self.height} image")
        return box_mask(region.box, self.width, self.height, h, w)


class RegionAttnProcessor:
    """Cross-attention where queries inside a region's box read that region's prompt."""

    def __init__(self, inner: Any, controller: RegionController):
        self.inner = inner
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is None or not self.controller.regions or hidden_states.dim() != 3:
            return out
        batch, n = hidden_states.shape[:2]
        for region, positive, negative in self.controller.regions:
            ehs = self.controller.embeds(positive, negative, batch).to(encoder_hidden_states)
            region_out = self.inner(attn, hidden_states, ehs, attention_mask, temb, *args, **kwargs)
            m = self.controller.mask(region, n).to(out).view(1, n, 1)
            out = torch.lerp(out, region_out, m)
        return out


def install_regions(unet: Any, controller: RegionController) -> dict[str, Any]:
    """Wrap every cross-attention (``attn2``) processor; returns the originals for restoring."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor({
        name: RegionAttnProcessor(proc, controller) if ".attn2." in name else proc
        for name, proc in original.items()
    })
    return original


def _concepts_of(model_dir: str | Path) -> list[dict[str, Any]]:
    """The concept entries of a fused model's ``concepts.json`` (none when the file is absent)."""
    path = Path(model_dir) / CONCEPTS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(read_text(path, "concepts file"))
    except json.JSONDecodeError as err:
        raise UserError(f"'{path}' is not valid JSON ({err.msg}); fuse the model again") from None
    concepts = data.get("concepts", []) if isinstance(data, dict) else None
    if not isinstance(concepts, list) or not all(
            isinstance(c, dict) and isinstance(c.get("words", []), list) and isinstance(c.get("tokens", {}), dict)
            for c in concepts):
        raise UserError(f"'{path}' is not a concepts file written by difflora fuse; fuse the model again")
    return concepts


def check_concept_words(prompts: list[str], model_dir: str | Path) -> None:
    """Refuse ``<word>`` tokens the model does not know (a typo would silently sample nothing)."""
    known: set[str] = set()
    for concept in _concepts_of(model_dir):
        known.update(map(str, concept.get("words", [])))
    for prompt in prompts:
        for word in re.findall(r"<[^<>\s]+>", prompt):
            if word not in known:
                hint = f"known: {', '.join(sorted(known))}" if known else "the model has no concept words"
                raise UserError(f"unknown concept word '{word}' in prompt {prompt!r}; {hint}")


@dataclass
class RegionsConfig:
    """Sample one image with a global prompt and per-region prompts (Mix-of-Show)."""

    model: str = field(metadata={"help": "a diffusers model folder (e.g. the output of difflora fuse)"})
    output_dir: str = field(metadata={"help": "where image.png, layout.png and settings.json go"})
    prompt: str = field(default="", metadata={"help": "global prompt (whole image outside the boxes)"})
    negative_prompt: str = field(default="", metadata={"help": "global negative prompt"})
    region: list[str] = field(default_factory=list, metadata={
        "help": "'x0,y0,x1,y1|prompt[|negative]', pixels or fractions; repeat for several regions"})
    layout: str | None = field(default=None, metadata={
        "help": "YAML/JSON with prompt, negative_prompt and regions: [{box: [x0,y0,x1,y1], prompt, negative_prompt}]"})
    adapter: str | None = field(default=None, metadata={"help": "T2I-Adapter folder (keypose, sketch, ...)"})
    condition: str | None = field(default=None, metadata={"help": "condition image for the adapter"})
    adapter_weight: float = field(default=1.0, metadata={"help": "adapter conditioning scale"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    steps: int = field(default=25, metadata={"help": "denoising steps"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance"})
    height: int | None = field(default=None, metadata={"help": "pixels (default: the model's size)"})
    width: int | None = field(default=None, metadata={"help": "pixels (default: the model's size)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an earlier image.png, layout.png and settings.json in output_dir (other files are kept)"})

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if (self.adapter is None) != (self.condition is None):
            raise UserError("--adapter and --condition go together: give both or neither")
        check_image_size(self.height, self.width)


def _load_layout(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"layout file '{p}' does not exist; check --layout")
    try:
        data = yaml.safe_load(read_text(p, "layout file"))  # JSON is YAML too
    except yaml.YAMLError as err:
        raise UserError(f"layout file '{p}' is not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("regions", []), list):
        raise UserError(f"layout file '{p}' must hold prompt, negative_prompt and a list of regions")
    for key in ("prompt", "negative_prompt"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise UserError(f"layout file '{p}': '{key}' must be text, got {data[key]!r}")
    return data


def _load_pipeline(cfg: RegionsConfig, family: ModelFamily) -> Any:
    from diffusers import T2IAdapter

    if not Path(cfg.model).is_dir():
        raise UserError(f"model '{cfg.model}' is not a folder; pass a diffusers model folder")
    try:
        pipe = family.load_pipeline(cfg.model)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model '{cfg.model}' ({first})") from None
    if cfg.adapter is not None:
        if not (Path(cfg.adapter) / "config.json").is_file():
            raise UserError(f"adapter '{cfg.adapter}' is not a T2I-Adapter folder (no config.json); check --adapter")
        try:
            adapter = T2IAdapter.from_pretrained(cfg.adapter)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"cannot load adapter '{cfg.adapter}' ({str(err).strip().splitlines()[0]}); "
                            "pass a diffusers T2I-Adapter folder") from None
        pipe = family.adapter_pipeline(pipe, adapter)
    pipe.set_progress_bar_config(desc="sampling")
    return pipe.to(cfg.device)


def _default_size(model: str) -> int:
    """The model's native image size, read from its configs (checked before loading any weights)."""
    try:
        unet = json.loads((Path(model) / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((Path(model) / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"model '{model}' is not a diffusers Stable Diffusion folder (unet/ and vae/ configs); "
                        "pass the folder difflora fuse wrote or a base model") from None


def concept_tokens(model_dir: str | Path) -> dict[str, list[str]]:
    """Concept word -> its tokens (one per cross-attention layer for ED-LoRA concepts)."""
    return {str(w): [str(x) for x in t] for c in _concepts_of(model_dir) for w, t in c.get("tokens", {}).items()}


def _encode(pipe: Any, prompt: str, tokens: dict[str, list[str]] | None = None,
            family: ModelFamily | None = None) -> Conditioning:
    """One prompt's conditioning by the family's recipe; token states (1, L*T, D) layer-wise when the
    model has ED-LoRA concepts (SDXL: the pooled embedding is the mean of the layers')."""
    from difflora.families import family_of_pipeline

    family = family if family is not None else family_of_pipeline(pipe)
    tokens = tokens or {}
    layers = len(cross_attention_layers(pipe.unet)) if is_layerwise(tokens) else 1
    with torch.no_grad():
        return layerwise_conditioning(family, family.tokenizers_of(pipe), family.text_encoders_of(pipe), [prompt],
                                      tokens, layers, device=pipe.device)


def draw_layout(image: Any, regions: list[Region], min_size: int = 256) -> Any:
    """The image (upscaled to at least ``min_size``) with each box outlined and labelled."""
    from PIL import ImageDraw

    scale = max(1, math.ceil(min_size / min(image.size)))
    canvas = image.convert("RGB").resize((image.width * scale, image.height * scale))
    draw = ImageDraw.Draw(canvas)
    colours = ["red", "lime", "blue", "yellow", "magenta", "cyan"]
    for i, region in enumerate(regions):
        x0, y0, x1, y1 = (v * scale for v in region.box)
        colour = colours[i % len(colours)]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)
        draw.text((x0 + 3, y0 + 2), f"{i + 1}: {region.prompt}", fill=colour)
    return canvas


# What a run writes into output_dir: what --overwrite replaces, and nothing else.
OUTPUTS = Outputs("sample-regions", ("image.png", "layout.png", "settings.json"))


@output_job
def sample_regions(cfg: RegionsConfig) -> dict[str, Any]:
    """Sample one regionally controlled image and write it with its layout and settings."""
    check_device(cfg.device)
    out = Path(cfg.output_dir)
    if (out / "image.png").exists() and not cfg.overwrite:
        raise UserError(f"'{out / 'image.png'}' exists; choose another output_dir or pass --overwrite")
    # The new files replace the old ones as they are written; a user's file of the same name is refused.
    prepare_output_dir(out, OUTPUTS, overwrite=cfg.overwrite, clear=False)
    layout = _load_layout(cfg.layout) if cfg.layout else {}
    prompt = cfg.prompt or str(layout.get("prompt", ""))
    negative = cfg.negative_prompt or str(layout.get("negative_prompt", ""))
    if not prompt:
        raise UserError("no global prompt; give --prompt or 'prompt' in the layout file")
    if cfg.adapter is not None and not (Path(cfg.adapter) / "config.json").is_file():
        raise UserError(f"adapter '{cfg.adapter}' is not a T2I-Adapter folder (no config.json); check --adapter")
    condition = None
    if cfg.condition is not None:
        if not Path(cfg.condition).is_file():
            raise UserError(f"condition image '{cfg.condition}' does not exist; check --condition")
        condition = read_image(cfg.condition)
    default = _default_size(cfg.model)
    height, width = cfg.height or default, cfg.width or default
    regions = [parse_region(r, width, height) for r in cfg.region]
    for i, item in enumerate(layout.get("regions", [])):
        if not isinstance(item, dict) or "box" not in item or "prompt" not in item:
            raise UserError(f"layout region {i + 1} needs 'box' and 'prompt'")
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise UserError(f"layout region {i + 1}: 'prompt' must be non-empty text, got {item['prompt']!r}")
        if item.get("negative_prompt") is not None and not isinstance(item["negative_prompt"], str):
            raise UserError(f"layout region {i + 1}: 'negative_prompt' must be text, got {item['negative_prompt']!r}")
        box = resolve_box(item["box"], width, height, what=f"layout region {i + 1} box")
        regions.append(Region(box, item["prompt"].strip(), item.get("negative_prompt")))
    check_concept_words([prompt, negative, *(r.prompt for r in regions)], cfg.model)
    family = family_of_folder(cfg.model)
    pipe = _load_pipeline(cfg, family)  # only after every input is checked: loading is the slow part

    tokens = concept_tokens(cfg.model)
    controller = RegionController(width, height, guidance=cfg.guidance_scale > 1)
    for region in regions:
        controller.add(region, _encode(pipe, region.prompt, tokens, family).hidden_states,
                       _encode(pipe, region.negative_prompt if region.negative_prompt is not None else negative,
                               tokens, family).hidden_states)
    before = dict(pipe.unet.attn_processors)
    if is_layerwise(tokens):  # each cross-attention layer reads its own tokens' encoding
        install_layerwise(pipe.unet, pipe.tokenizer.model_max_length)
        text = family.pipeline_embeds(_encode(pipe, prompt, tokens, family), _encode(pipe, negative, tokens, family))
    else:
        text = {"prompt": prompt, "negative_prompt": negative}
    install_regions(pipe.unet, controller)
    extra = {"image": condition, "adapter_conditioning_scale": cfg.adapter_weight} if condition is not None else {}
    try:
        image = pipe(**text, num_inference_steps=cfg.steps,
                     guidance_scale=cfg.guidance_scale, height=height, width=width,
                     generator=torch.Generator(pipe.device).manual_seed(cfg.seed), **extra).images[0]
    finally:
        pipe.unet.set_attn_processor(before)

    atomic_save_image(image, out / "image.png")
    atomic_save_image(draw_layout(image, regions), out / "layout.png")
    settings = {**config_to_dict(cfg), "prompt": prompt, "negative_prompt": negative, "height": height,
                "width": width, "regions": [asdict(r) for r in regions]}
    atomic_write_text(out / "settings.json", json.dumps(settings, indent=2))
    return {"image": str(out / "image.png"), "regions": len(regions)}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RegionsConfig, argv, prog="difflora sample-regions")
    result = sample_regions(cfg)
    print(f"wrote {result['image']} with {result['regions']} region(s)")
