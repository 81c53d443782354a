"""Samples and grids: how people look at what training produced.

``generate`` draws prompts x seeds with one generator per image, so an image depends only on its
(prompt, seed) and not on batching; ``make_grid`` lays them out with labels. ``difflora sample``
wraps both: base model + LoRA files -> images, a grid and a manifest that reproduces them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from difflora.config import (
    check_device,
    check_image_size,
    config_from_mapping,
    config_to_dict,
    parse_config,
    read_text,
)
from difflora.errors import UserError
from difflora.output_dir import Outputs, atomic_save_image, atomic_write_text, output_job, prepare_output_dir

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int = 25, guidance: float = 7.5,
             negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
             batch_size: int = 8, progress: bool = True) -> list[list[Image.Image]]:
    """Images indexed ``[prompt][seed]``.

    Each image gets its own ``torch.Generator(device).manual_seed(seed)``, so the image of a
    (prompt, seed) pair is the same whatever the batch size or the other prompts.
    """
    if not prompts or not seeds:
        raise UserError("sampling needs at least one prompt and one seed")
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    jobs = [(i, j) for i in range(len(prompts)) for j in range(len(seeds))]
    rows: list[list[Image.Image | None]] = [[None] * len(seeds) for _ in prompts]
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if device.type == "mps" else device
    with tqdm(total=len(jobs), desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            images = pipe(
                [prompts[i] for i, _ in chunk],
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=[torch.Generator(gen_device).manual_seed(seeds[j]) for _, j in chunk],
            ).images
            for (i, j), image in zip(chunk, images):
                rows[i][j] = image
            bar.update(len(chunk))
    return rows  # type: ignore[return-value]


def _wrap(text: str, width: float, length: Callable[[str], float], max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than a line is cut; '...' marks dropped text."""
    lines: list[str] = []
    for word in text.split():
        pieces = []
        while length(word) > width and len(word) > 1:  # a very long word: cut it where it overflows
            cut = max(k for k in range(1, len(word)) if length(word[:k]) <= width or k == 1)
            pieces.append(word[:cut])
            word = word[cut:]
        if pieces:
            lines.extend([*pieces, word])
        elif lines and length(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines


def make_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
              min_cell: int = 96) -> Image.Image:
    """A labelled grid: one row per prompt (label on the left), one column per seed (label on top).

    Images smaller than ``min_cell`` pixels are enlarged by a whole factor (nearest neighbour, so no
    pixel is invented): a 32 px toy sample is shown at 96 px, readable beside its label.
    """
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one image")
    w, h = rows[0][0].size
    factor = max(1, -(-min_cell // max(w, h, 1)))
    w, h = w * factor, h * factor
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # A compact label column: about one cell wide, labels word-wrapped (spaces kept between words).
    label_w = int(min(max(w, 110), 1.5 * w + 40))
    line_h, pad_top = 11, 14
    cell = max(w, 1)
    grid = Image.new("RGB", (label_w + cell * len(rows[0]), pad_top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((label_w + j * cell + 2, 1), label, fill="black", font=font)
    for i, row in enumerate(rows):
        text = row_labels[i] if i < len(row_labels) else ""
        # Pillow's default font draws a space 2 px wide, so words run together: draw two.
        lines = _wrap(text, label_w - 6, lambda s: measure.textlength(s.replace(" ", "  "), font=font),
                      max(1, (h - 4) // line_h))
        for n, line in enumerate(lines):
            draw.text((3, pad_top + i * h + 2 + line_h * n), line.replace(" ", "  "), fill="black", font=font)
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (label_w + j * cell, pad_top + i * h))
    return grid


def load_pipeline(model: str, dtype: str = "float32", device: str = "cpu", scheduler: str = "ddim"):
    """Any SD / SDXL folder or hub id, with the chosen sampler."""
    import diffusers
    from diffusers import DiffusionPipeline

    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{scheduler}'; valid: {', '.join(SCHEDULERS)}")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"'{model}' is not a diffusers model folder (no model_index.json)")
    # SD 1.x/2.x pipelines come with a safety checker (not wanted for research grids); SDXL has none.
    if (path / "model_index.json").is_file():
        try:
            has_checker = "safety_checker" in json.loads(read_text(path / "model_index.json", "model index"))
        except json.JSONDecodeError as err:
            raise UserError(f"'{path / 'model_index.json'}' is not valid JSON ({err.msg}); the model folder is "
                            "damaged, download or copy it again") from None
    else:
        has_checker = "xl" not in model.lower()
    extra = {"safety_checker": None} if has_checker else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model '{model}': {str(err).strip().splitlines()[0]}") from None
    # diffusers before 0.42 knows only ``torch_dtype`` and ignores ``dtype`` with a warning: cast instead.
    if any(getattr(m, "dtype", torch_dtype) != torch_dtype for m in pipe.components.values()
           if isinstance(m, torch.nn.Module)):
        pipe.to(dtype=torch_dtype)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class SampleConfig:
    """Sample a base model with LoRA files into images, a labelled grid and a manifest."""

    model: str = field(default="", metadata={"help": "base model: hub id or diffusers folder"})
    lora: list[str] = field(default_factory=list, metadata={"help": "LoRA file or folder, optionally FILE:SCALE"})
    prompt: list[str] = field(default_factory=list, metadata={"help": "a prompt (repeatable)"})
    prompts: str | None = field(default=None, metadata={"help": "text file with one prompt per line"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3], metadata={"help": "one column per seed"})
    steps: int = field(default=25, metadata={"help": "sampler steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    negative: str | None = field(default=None, metadata={"help": "negative prompt"})
    scheduler: str = field(default="ddim", metadata={"help": f"one of {', '.join(SCHEDULERS)}"})
    height: int | None = field(default=None, metadata={"help": "image height (default: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: the model's)"})
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, mps"})
    batch_size: int = field(default=8, metadata={"help": "images per pipeline call"})
    out: str = field(default="samples", metadata={"help": "output folder"})
    manifest: str | None = field(default=None, metadata={
        "help": "re-run the settings of a manifest.json (other flags given override them, e.g. --out)"})

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler '{self.scheduler}'; valid: {', '.join(SCHEDULERS)}")
        if not self.seeds:
            raise UserError("--seeds is empty; give at least one seed, e.g. --seeds 0 1 2")
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        check_image_size(self.height, self.width)
        for spec in self.lora:
            _parse_lora(spec)


def _parse_lora(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (file, scale); a path that exists as written is never split.

    When FILE exists but SCALE is not a finite number the scale is named as the problem (not the
    file, which exists).
    """
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or Path(spec).exists():
        return spec, 1.0
    try:
        value = float(scale)
    except ValueError:
        if Path(path).exists():
            raise UserError(f"--lora '{spec}': the scale '{scale}' is not a number; write FILE:SCALE, "
                            f"e.g. {path}:0.8") from None
        return spec, 1.0
    if not math.isfinite(value):
        raise UserError(f"--lora '{spec}': the scale must be a finite number, got '{scale}'; e.g. {path}:0.8")
    return path, value


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompts file (``#`` starts a comment line)."""
    pf = Path(path)
    if not pf.is_file():
        raise UserError(f"prompts file '{pf}' does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in read_text(pf, "prompts file").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompts file '{pf}' is empty; write one prompt per line")
    return prompts


def _absolute_if_local(path: str) -> str:
    """Local paths become absolute so a manifest re-runs from any folder; hub ids stay as they are."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _is_sample_folder(out: Path) -> bool:
    """Whether ``out`` holds a manifest written by difflora sample (its images and grid are then ours)."""
    try:
        data = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("settings"), dict) and isinstance(data.get("images"), list)


# What a sampling job writes into --out; the manifest says they are difflora's, so no record is kept.
OUTPUTS = Outputs("sample", ("grid.png", "manifest.json"), patterns=(r"p\d+-s-?\d+\.png",),
                  recognise=_is_sample_folder, record=False)


@output_job
def sample(cfg: SampleConfig) -> Path:
    """Run a sampling job; return the output folder (images, grid.png, manifest.json)."""
    if not cfg.model:
        raise UserError("missing --model; give a hub id or a diffusers folder")
    check_device(cfg.device)
    prompts = list(cfg.prompt) + (read_prompts(cfg.prompts) if cfg.prompts else [])
    if not prompts:
        raise UserError("no prompt given; use --prompt TEXT (repeatable) or --prompts FILE")
    loras = [_parse_lora(s) for s in cfg.lora]
    for path, _ in loras:
        if not Path(path).exists():
            raise UserError(f"LoRA file '{path}' does not exist; check --lora FILE[:SCALE]")
    out = Path(cfg.out)
    names = [f"p{i:02d}-s{seed}.png" for i in range(len(prompts)) for seed in cfg.seeds]
    # Everything that can fail on the user's input happens before anything is written; a rerun
    # replaces the files of an earlier sampling, never a file of the user's.
    prepare_output_dir(out, OUTPUTS.with_names(*names), overwrite=False, clear=False, what="--out")
    pipe = load_pipeline(cfg.model, cfg.dtype, cfg.device, cfg.scheduler)
    if loras:
        from difflora.lora_io import apply_loras

        apply_loras(pipe, loras)
    rows = generate(pipe, prompts, cfg.seeds, steps=cfg.steps, guidance=cfg.guidance, negative_prompt=cfg.negative,
                    height=cfg.height, width=cfg.width, batch_size=cfg.batch_size)
    images = []
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            name = f"p{i:02d}-s{cfg.seeds[j]}.png"
            atomic_save_image(image, out / name)
            images.append({"file": name, "prompt": prompts[i], "seed": cfg.seeds[j]})
    atomic_save_image(make_grid(rows, prompts, [f"seed {s}" for s in cfg.seeds]), out / "grid.png")
    settings = config_to_dict(cfg) | {
        "model": _absolute_if_local(cfg.model),
        "lora": [f"{_absolute_if_local(p)}:{w:g}" for p, w in loras],
        "prompt": prompts, "prompts": None, "manifest": None,
    }
    atomic_write_text(out / "manifest.json", json.dumps({"settings": settings, "images": images}, indent=2) + "\n")
    return out


def config_from_manifest(manifest: str | Path, overrides: SampleConfig | None = None) -> SampleConfig:
    """The settings of a ``manifest.json``; fields of ``overrides`` that differ from the defaults win."""
    mf = Path(manifest)
    if not mf.is_file():
        raise UserError(f"manifest '{mf}' does not exist; pass the manifest.json written by difflora sample")
    try:
        data = json.loads(read_text(mf, "manifest"))
    except json.JSONDecodeError as err:
        raise UserError(f"'{mf}' is not valid JSON ({err.msg}, line {err.lineno}); pass the manifest.json "
                        "written by difflora sample") from None
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        raise UserError(f"'{mf}' is not a difflora sample manifest (no 'settings' mapping); "
                        "pass the manifest.json written by difflora sample")
    # The manifest's values are held to the same types and checks as flags; flags given win.
    settings = dict(settings)
    if overrides is not None:
        defaults = SampleConfig()
        for f in fields(SampleConfig):
            value = getattr(overrides, f.name)
            if value != getattr(defaults, f.name):
                settings[f.name] = value
    settings["manifest"] = None
    return config_from_mapping(SampleConfig, settings, source=str(mf))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SampleConfig, list(argv or []), prog="difflora sample")
    if cfg.manifest:
        cfg = config_from_manifest(cfg.manifest, overrides=cfg)
    out = sample(cfg)
    print(f"wrote {out / 'grid.png'} and {out / 'manifest.json'}")
