"""Scores: how close generated images are to their prompts and to the concept's photos.

The DreamBooth protocol (Ruiz et al., 2023): CLIP-T is the cosine between an image and its prompt;
CLIP-I (and DINO) is the mean cosine over ALL pairs of generated and reference images. Scores are
cosines in [0, 1] as in that paper's tables (torchmetrics' CLIPScore reports 100 x cosine).

CLIP-T goes through torchmetrics' ``CLIPScore`` with its callable (model, processor) form. With
transformers 5 the CLIP feature methods return output objects instead of tensors, which
torchmetrics 1.9 cannot normalise, so the model is handed over behind ``_TensorFeatures``, a thin
adapter that returns the projected embedding tensor. CLIP-I and DINO use the models directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from difflora.config import check_device, parse_config, read_text
from difflora.data import UnreadableImage, load_image, read_images
from difflora.errors import UserError
from difflora.output_dir import Outputs, atomic_write_text, output_job, prepare_output_dir

# DreamBooth paper, Table 1 (Stable Diffusion DreamBooth and real images).
PAPER_REFERENCE = {
    "DreamBooth (Stable Diffusion)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "Real images": {"dino": 0.774, "clip_i": 0.885, "clip_t": None},
}


def _as_tensor(out) -> torch.Tensor:
    """Projected features from a transformers 4 tensor or a transformers 5 output object."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"cannot read features from {type(out).__name__}")


class _TensorFeatures(nn.Module):
    """A CLIPModel whose get_*_features return tensors (what torchmetrics 1.x expects)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))


_CACHE: dict[tuple[str, str, str], tuple] = {}  # (kind, name, device) -> (model, processor)


def _clip(name: str, device: str):
    from transformers import CLIPModel, CLIPProcessor

    key = ("clip", name, device)
    if key not in _CACHE:
        try:
            model = CLIPModel.from_pretrained(name).to(device).eval()
            processor = CLIPProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load CLIP model '{name}': {str(err).strip().splitlines()[0]}") from None
        _CACHE[key] = (model, processor)
    return _CACHE[key]


def _dino(name: str, device: str):
    from transformers import AutoImageProcessor, AutoModel

    key = ("dino", name, device)
    if key not in _CACHE:
        try:
            try:  # DINO ViTs ship without the pooler head; do not build a random one
                model = AutoModel.from_pretrained(name, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(name)
            model = model.to(device).eval()
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load DINO model '{name}': {str(err).strip().splitlines()[0]}") from None
        _CACHE[key] = (model, processor)
    return _CACHE[key]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def clip_image_embeddings(images: list[Image.Image], clip_model: str, device: str = "cpu") -> torch.Tensor:
    model, processor = _clip(clip_model, device)
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return _normalise(_as_tensor(model.get_image_features(pixel_values=pixels.to(device))).float())


@torch.no_grad()
def clip_text_embeddings(prompts: list[str], clip_model: str, device: str = "cpu") -> torch.Tensor:
    model, processor = _clip(clip_model, device)
    tok = processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
    return _normalise(_as_tensor(model.get_text_features(**{k: v.to(device) for k, v in tok.items()})).float())


@torch.no_grad()
def dino_embeddings(images: list[Image.Image], dino_model: str, device: str = "cpu") -> torch.Tensor:
    """The CLS token of the last layer, as in the DreamBooth paper's DINO metric."""
    model, processor = _dino(dino_model, device)
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return _normalise(model(pixel_values=pixels.to(device)).last_hidden_state[:, 0].float())


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all (row of a, row of b) pairs; rows are unit vectors."""
    return float((a @ b.T).mean())


@torch.no_grad()
def clip_t(images: list[Image.Image], prompts: list[str], clip_model: str, device: str = "cpu") -> float:
    """Mean over images of max(cos(image, its prompt), 0), through torchmetrics' CLIPScore."""
    import numpy as np
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = _clip(clip_model, device)
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor)).to(device)
    tensors = [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
               for im in images]
    metric.update(tensors, prompts)
    return float(metric.compute()) / 100.0


def score_images(images: list[Image.Image], prompts: str | list[str], reference: list[Image.Image] | None,
                 clip_model: str, dino_model: str | None = None, device: str = "cpu",
                 progress: bool = True) -> dict[str, float]:
    """CLIP-T (image vs its prompt), CLIP-I and DINO (all generated x reference pairs)."""
    from tqdm.auto import tqdm

    if not images:
        raise UserError("no images to score")
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise UserError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image or one for all")
    # One tick per embedding pass: the models' forward passes are where scoring spends its time.
    passes = 1 + (2 if reference else 0) + (2 if reference and dino_model else 0)
    with tqdm(total=passes, desc="scoring", unit="pass", disable=not progress, leave=False) as bar:
        def embed(fn: Callable[..., Any], *args: Any) -> Any:
            out = fn(*args, device)
            bar.update(1)
            return out

        scores = {"clip_t": embed(clip_t, images, prompts, clip_model)}
        if reference:
            gen, ref = (embed(clip_image_embeddings, x, clip_model) for x in (images, reference))
            scores["clip_i"] = mean_pairwise_cosine(gen, ref)
            if dino_model:
                gen, ref = (embed(dino_embeddings, x, dino_model) for x in (images, reference))
                scores["dino"] = mean_pairwise_cosine(gen, ref)
    return scores


def load_images(folder: str | Path, what: str = "images", flag: str | None = None) -> list[Image.Image]:
    """Every readable image of ``folder`` in name order (unreadable ones are skipped with a warning).

    A missing or empty folder is a :class:`UserError` naming ``flag`` (default ``--<what>``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder '{folder}' does not exist; check {flag or '--' + what}")
    return read_images(folder, what)[1]  # each file decoded once


def _load_listed(folder: Path, names: list[str]) -> list[Image.Image]:
    """The images a sample manifest lists; a missing or broken one is named."""
    images = []
    for name in names:
        try:
            images.append(load_image(folder / name))
        except UnreadableImage as err:
            raise UserError(f"image '{folder / name}' listed in manifest.json is missing or unreadable "
                            f"({err.reason}); re-run difflora sample or drop the manifest") from None
    return images


def markdown_table(scores: dict[str, float]) -> str:
    """Our scores beside the DreamBooth paper's (cosines in [0, 1]; higher is better)."""
    rows = [_TABLE_HEADER, "|---|---|---|---|"]

    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    rows.append(f"| this run | {cell(scores.get('dino'))} | {cell(scores.get('clip_i'))} | {cell(scores.get('clip_t'))} |")
    for name, ref in PAPER_REFERENCE.items():
        rows.append(f"| {name} (paper) | {cell(ref['dino'])} | {cell(ref['clip_i'])} | {cell(ref['clip_t'])} |")
    return "\n".join(rows) + "\n"


@dataclass
class EvalConfig:
    """Score generated images: CLIP-T against prompts, CLIP-I / DINO against reference images."""

    images: str = field(default="", metadata={"help": "folder of generated images (a sample manifest is read)"})
    prompts: str | None = field(default=None, metadata={
        "help": "text file, one prompt per image (in name order, or the manifest's order)"})
    prompt: str | None = field(default=None, metadata={"help": "one prompt for every image"})
    reference: str | None = field(default=None, metadata={"help": "folder of the concept's real images"})
    clip_model: str = field(default="", metadata={"help": "CLIP folder or hub id"})
    dino_model: str | None = field(default=None, metadata={"help": "DINO ViT folder or hub id (optional)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    out: str = field(default="metrics.json", metadata={"help": "where to write the scores"})


_TABLE_HEADER = "| cosine similarity | DINO | CLIP-I | CLIP-T |"


def _prepare_out(out: Path) -> None:
    """Check where the scores go before any model loads: ``--out`` is the user's choice and is
    replaced; the table beside it only if an earlier evaluation wrote it."""
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give a file path such as {out / 'metrics.json'}")
    if out.suffix.lower() == ".md":
        raise UserError(f"--out '{out}' would be replaced by the markdown table written beside it; "
                        "give a .json path")
    table = out.with_suffix(".md").name

    def is_ours(folder: Path) -> bool:
        try:
            with open(folder / table, encoding="utf-8") as f:
                return f.readline().rstrip("\n") == _TABLE_HEADER
        except (OSError, UnicodeDecodeError):
            return False

    prepare_output_dir(out.parent, Outputs("eval", (table,), recognise=is_ours, record=False), overwrite=False,
                       clear=False, what="--out folder")


@output_job
def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Score a folder of images; write ``cfg.out`` (JSON) and a markdown table beside it."""
    if not cfg.images or not cfg.clip_model:
        raise UserError("--images and --clip-model are required")
    check_device(cfg.device)
    out = Path(cfg.out)
    _prepare_out(out)
    folder = Path(cfg.images)
    manifest = folder / "manifest.json"
    prompts: str | list[str] | None = None
    if manifest.is_file():  # a folder written by difflora sample: its image list, and its prompts
        try:
            entries = json.loads(read_text(manifest, "manifest"))["images"]
            files, prompts = [str(e["file"]) for e in entries], [str(e["prompt"]) for e in entries]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"'{manifest}' is not a difflora sample manifest; remove it or re-run "
                            "difflora sample") from None
        images = _load_listed(folder, files)
    else:
        images = load_images(folder, "images")
    if cfg.prompts:
        from difflora.sampling import read_prompts

        prompts = read_prompts(cfg.prompts)
    elif cfg.prompt:
        prompts = cfg.prompt
    if prompts is None:
        raise UserError("give --prompt TEXT, --prompts FILE, or a folder written by difflora sample")
    reference = load_images(cfg.reference, "reference") if cfg.reference else None
    scores = score_images(images, prompts, reference, cfg.clip_model, cfg.dino_model, cfg.device)
    atomic_write_text(out, json.dumps(scores, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown_table(scores))
    return scores


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EvalConfig, argv, prog="difflora eval")
    scores = evaluate(cfg)
    print(markdown_table(scores))
