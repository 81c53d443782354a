"""``difflora edlora``: ED-LoRA concept training for Mix-of-Show.

A concept is a few words (``<robot1>+<robot2>``). Each word gets one new token per UNet
cross-attention layer ("layer-wise embeddings"): the prompt is encoded once per layer with that
layer's tokens, the L encodings travel to the UNet side by side along the token axis, and
:class:`LayerwiseAttnProcessor` hands each ``attn2`` its own slice. The number of layers is counted
from the model, so any SD 1.x / 2.x layout works.

Trained: the concept's embedding rows (a separate small parameter, so no other row of the
embedding matrix can move), LoRA on the text encoder's and UNet's attention, each with its own
learning rate. The embeddings freeze once their mean norm reaches ``embedding_freeze_norm``
(Mix-of-Show's guard against tokens that drown the rest of the prompt).

Images, checkpoints, outputs, loss and samples use the same code as the DreamBooth trainer
(:mod:`difflora.data`, :mod:`difflora.train`). The result is one file, ``edlora.safetensors``:
per-layer embeddings, LoRA weights in diffusers key style, and metadata (words, tokens, layers,
base model, rank, alpha); ``difflora fuse`` takes it directly.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from difflora.config import config_to_dict, parse_config
from difflora.errors import UserError
from difflora.optim import OPTIMIZER_NAMES, build_optimizer

logger = logging.getLogger(__name__)

EDLORA_FILE = "edlora.safetensors"
META_KEY = "edlora"  # header key with the concept's words, tokens, layers, base model, rank, alpha
EMBEDDING_PREFIX = "edlora_embeddings."  # tensor key per word: (layers, width)
_WORD = re.compile(r"^<[A-Za-z0-9_\-]+>$")


def _h(text: str, default=None, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class EDLoRAConfig:
    """Train one ED-LoRA concept (layer-wise embeddings + LoRA) for Mix-of-Show fusion."""

    # Model
    pretrained_model_name_or_path: str = field(metadata={"help": "base model: hub id or local diffusers folder"})
    revision: str | None = _h("model revision on the hub")
    variant: str | None = _h("weights variant, e.g. fp16")
    # Concept
    concept_words: str = _h("the concept's new words, '+'-separated, e.g. '<robot1>+<robot2>'", "<concept1>+<concept2>")
    initializer: str = _h("per word 'rand' (N(0, init_std^2)) or a class word to start from, e.g. 'rand+robot'",
                          "rand+object")
    init_std: float = _h("standard deviation of 'rand' initial embeddings", 0.013)
    # Data
    instance_data_dir: str | None = _h("folder with the concept's images")
    instance_prompt: str = _h("prompt for images without a caption; <TOK> becomes the concept words",
                              "a photo of <TOK>")
    captions: bool = _h("read each image's caption from name.txt (beside it, or in caption_dir)", True)
    caption_dir: str | None = _h("folder of name.txt captions (default: beside the images)")
    caption_placeholder: str = _h("text in captions replaced by the concept words", "<TOK>")
    mask_dir: str | None = _h("folder of name.png subject masks (white = subject) that weight the loss")
    resolution: int = _h("training image size in pixels (multiple of 8)", 512)
    center_crop: bool = _h("center-crop instead of random crops", False)
    random_flip: bool = _h("flip images horizontally at random", False)
    # LoRA
    rank: int = _h("LoRA rank r (text-encoder and UNet attention)", 4)
    lora_alpha: float | None = _h("LoRA alpha (scale alpha/r); default: equal to rank", None)
    # Optimisation
    optimizer: str = _h(f"one of {', '.join(OPTIMIZER_NAMES)}", "scaled_adamw")
    optimizer_reg: float | None = _h("damping reg of the scaled optimizers; default: library's")
    embedding_lr: float = _h("learning rate of the concept's token embeddings", 1e-3)
    text_encoder_lr: float = _h("text-encoder LoRA learning rate", 1e-5)
    unet_lr: float = _h("UNet LoRA learning rate", 1e-4)
    embedding_freeze_norm: float = _h("freeze the embeddings once their mean norm reaches this (0 disables)", 0.55)
    scale_lr: bool = _h("multiply learning rates by batch size x accumulation", False)
    adam_beta1: float = _h("AdamW beta1", 0.9)
    adam_beta2: float = _h("AdamW beta2", 0.999)
    adam_weight_decay: float = _h("decoupled weight decay", 1e-2)
    adam_epsilon: float = _h("AdamW epsilon", 1e-8)
    sgd_momentum: float = _h("momentum of sgd / scaled_sgd", 0.0)
    lr_scheduler: str = _h("diffusers schedule: constant, constant_with_warmup, linear, cosine, ...", "constant")
    lr_warmup_steps: int = _h("warm-up steps of the LR schedule", 0)
    max_grad_norm: float = _h("gradient clipping norm (0 disables)", 1.0)
    snr_gamma: float | None = _h("Min-SNR weighting gamma; off by default")
    noise_offset: float = _h("noise offset (Mix-of-Show uses 0.01)", 0.01)
    # Schedule
    train_batch_size: int = _h("images per micro-step", 2)
    gradient_accumulation_steps: int = _h("micro-steps per optimizer step", 1)
    max_train_steps: int | None = _h("optimizer steps; overrides num_train_epochs")
    num_train_epochs: int = _h("epochs over the images when max_train_steps is not set", 1)
    seed: int = _h("seed of every random draw", 0)
    device: str | None = _h("torch device (default: cuda if available, else cpu)")
    # Checkpoints and outputs
    output_dir: str = _h("where edlora.safetensors, samples and checkpoints go", "edlora-concept")
    overwrite: bool = _h("replace a finished run in output_dir (other files are kept)", False)
    checkpointing_steps: int = _h("save a resumable checkpoint every N steps", 500)
    checkpoints_total_limit: int | None = _h("keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _h("'latest' or a checkpoint-N folder to continue from")
    # Validation
    validation_prompt: str | None = _h("prompt(s) for sample grids, '|'-separated, <TOK> = the concept words; "
                                       "default: instance_prompt")
    num_validation_images: int = _h("seeds per validation prompt (0 turns sample grids off)", 4)
    validation_steps: int | None = _h("sample a grid every N steps (and always at the start and end)")
    validation_inference_steps: int = _h("sampler steps of validation grids", 25)
    validation_guidance: float = _h("classifier-free guidance of validation grids", 7.5)

    @property
    def words(self) -> list[str]:
        return parse_words(self.concept_words)

    @property
    def initializers(self) -> list[str]:
        return [w.strip() for w in self.initializer.split("+")]

    def validate(self) -> None:
        if not self.instance_data_dir:
            raise UserError("missing --instance_data_dir; point it at the folder of your concept's images")
        words = self.words
        if len(self.initializers) != len(words) or not all(self.initializers):
            raise UserError(f"--initializer needs one entry per concept word ({len(words)}), e.g. 'rand+dog'; "
                            f"got {self.initializer!r}")
        if self.rank <= 0:
            raise UserError(f"--rank must be a positive integer, got {self.rank}")
        if self.resolution <= 0 or self.resolution % 8:
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps <= 0:
            raise UserError(f"--max_train_steps must be positive, got {self.max_train_steps}")
        for name in ("embedding_lr", "text_encoder_lr", "unet_lr"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise UserError(f"unknown --optimizer '{self.optimizer}'; valid: {', '.join(OPTIMIZER_NAMES)}")
        if self.caption_placeholder not in self.instance_prompt:
            raise UserError(f"--instance_prompt must contain {self.caption_placeholder!r} where the concept words "
                            "go, e.g. 'a photo of <TOK>'")


# ------------------------------------------------------------------------------------------------
# Words, tokens and layer-wise prompts (shared with fusion and regional sampling)
# ------------------------------------------------------------------------------------------------


def parse_words(text: str) -> list[str]:
    """``'<w1>+<w2>'`` -> ``['<w1>', '<w2>']``; refuse malformed or repeated words."""
    words = [w.strip() for w in str(text).split("+") if w.strip()]
    if not words:
        raise UserError(f"concept words {text!r} are empty; write them like '<robot1>+<robot2>'")
    for w in words:
        if not _WORD.match(w):
            raise UserError(f"concept word {w!r} must look like '<name>' (letters, digits, _ or -), "
                            "e.g. '<robot1>+<robot2>'")
    if len(set(words)) != len(words):
        raise UserError(f"concept words {text!r} repeat a word; give each word its own name")
    return words


def layer_tokens(word: str, num_layers: int) -> list[str]:
    """The token strings of ``word`` for each cross-attention layer: ``<w>`` -> ``<w_l0>``, ...

    Lower case, because CLIP tokenizers lower-case prompts; the closing ``>`` keeps ``<w_l1>``
    from matching the start of ``<w_l10>``.
    """
    stem = word[1:-1].lower()
    return [f"<{stem}_l{i}>" for i in range(num_layers)]


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules (``attn2``) in a fixed order."""
    from diffusers.models.attention_processor import Attention

    names = [n for n, m in unet.named_modules()
             if isinstance(m, Attention) and n.split(".")[-1] == "attn2" and m.is_cross_attention]
    if not names:
        raise UserError("the UNet has no cross-attention layers; ED-LoRA needs a text-conditioned UNet")
    return names


def expand_prompt(prompt: str, tokens: dict[str, list[str]], layer: int) -> str:
    """``prompt`` as layer ``layer`` reads it: every concept word replaced by its token there.

    A word with a single token (a plain LoRA's trigger word) stays itself in every layer.
    """
    if not tokens:
        return prompt
    pattern = re.compile("|".join(re.escape(w) for w in sorted(tokens, key=len, reverse=True)))
    return pattern.sub(lambda m: tokens[m.group(0)][layer if len(tokens[m.group(0)]) > 1 else 0], prompt)


def is_layerwise(tokens: dict[str, list[str]]) -> bool:
    return any(len(t) > 1 for t in tokens.values())


def encode_layerwise(tokenizer, text_encoder, prompts: list[str], tokens: dict[str, list[str]],
                     num_layers: int) -> torch.Tensor:
    """(B, L*T, D): each prompt encoded once per layer with that layer's tokens, side by side.

    Prompts without layer-wise words are encoded once and repeated (same numbers, less work).
    """
    device = text_encoder.device
    per_layer = [[expand_prompt(p, tokens, layer) for layer in range(num_layers)] for p in prompts]
    flat = [v for variants in per_layer for v in dict.fromkeys(variants)]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    states = text_encoder(ids)[0]
    out, i = [], 0
    for variants in per_layer:
        unique = list(dict.fromkeys(variants))
        index = {v: i + k for k, v in enumerate(unique)}
        out.append(torch.cat([states[index[v]] for v in variants], dim=0))
        i += len(unique)
    return torch.stack(out)


class LayerwiseAttnProcessor:
    """Wraps a cross-attention processor so that layer ``index`` reads its own slice of the text.

    The UNet receives ``(B, L*T, D)``: L encodings of T tokens side by side. An input of any
    other length (e.g. a plain T-token prompt) passes through unchanged.
    """

    def __init__(self, inner: Any, index: int, num_layers: int, seq_len: int):
        self.inner, self.index, self.num_layers, self.seq_len = inner, index, num_layers, seq_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] == self.num_layers * self.seq_len:
            start = self.index * self.seq_len
            encoder_hidden_states = encoder_hidden_states[:, start:start + self.seq_len]
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def install_layerwise(unet: nn.Module, seq_len: int) -> dict[str, Any]:
    """Give every cross-attention layer its own text slice; returns the processors to restore."""
    layers = cross_attention_layers(unet)
    original = dict(unet.attn_processors)
    index = {f"{name}.processor": i for i, name in enumerate(layers)}
    unet.set_attn_processor({
        name: LayerwiseAttnProcessor(proc, index[name], len(layers), seq_len) if name in index else proc
        for name, proc in original.items()})
    return original


class LayerwisePipeline:
    """A Stable Diffusion pipeline that understands layer-wise concept words in prompt strings.

    ``pipe(prompts, negative_prompt=..., ...)`` encodes per layer and calls the wrapped pipeline
    with ``prompt_embeds``; everything else (``device``, ``unet``...) is the wrapped pipeline's.
    Install :func:`install_layerwise` on its UNet first.
    """

    def __init__(self, pipe: Any, tokens: dict[str, list[str]], num_layers: int):
        self.pipe, self.tokens, self.num_layers = pipe, tokens, num_layers

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_layerwise(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.tokens, self.num_layers)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        with torch.no_grad():
            embeds, negative_embeds = self.encode(prompts), self.encode(negatives)
        return self.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, **kwargs)


# ------------------------------------------------------------------------------------------------
# Concept embeddings: a small parameter in front of the frozen embedding table
# ------------------------------------------------------------------------------------------------


class ConceptEmbedding(nn.Module):
    """Token embedding whose rows ``start:`` come from a separate trainable parameter.

    Only the concept rows can change: they are the only trainable tensor; the table itself stays
    frozen (so weight decay or a stray gradient cannot touch another row).
    """

    def __init__(self, base: nn.Embedding, start: int, rows: torch.Tensor):
        super().__init__()
        self.base, self.start = base, start
        self.rows = nn.Parameter(rows.clone().float())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight[: self.start], self.rows.to(self.base.weight)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        is_concept = ids >= self.start
        picked = self.rows[(ids - self.start).clamp(min=0)].to(out.dtype)
        return torch.where(is_concept[..., None], picked, out)

    def mean_norm(self) -> float:
        return float(self.rows.detach().norm(dim=-1).mean())


def add_concept_tokens(tokenizer, text_encoder, words: list[str], initializers: list[str], num_layers: int,
                       init_std: float, generator: torch.Generator) -> tuple[ConceptEmbedding, dict[str, list[str]]]:
    """Add ``len(words) x num_layers`` tokens, initialise them, and wrap the embedding table."""
    tokens = {w: layer_tokens(w, num_layers) for w in words}
    new = [t for w in words for t in tokens[w]]
    clash = [t for t in new if t in tokenizer.get_vocab()]
    if clash:
        raise UserError(f"the tokenizer already has the token '{clash[0]}'; pick other concept words")
    start = len(tokenizer)
    tokenizer.add_tokens(new)
    table = text_encoder.get_input_embeddings()
    width = table.weight.shape[1]
    rows = []
    for init in initializers:
        if init == "rand":  # each layer's token drawn on its own
            rows.append(torch.randn(num_layers, width, generator=generator) * init_std)
            continue
        ids = tokenizer(init, add_special_tokens=False).input_ids
        if not ids or any(i >= start for i in ids):
            raise UserError(f"--initializer word {init!r} is not in the tokenizer; use 'rand' or a class word")
        row = table.weight.detach()[ids].float().mean(0).cpu()  # a multi-token class word: their mean
        rows.append(row.expand(num_layers, width))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    table.requires_grad_(False)
    wrapped = ConceptEmbedding(table, start, torch.cat(rows).to(table.weight.device))
    text_encoder.set_input_embeddings(wrapped)
    return wrapped, tokens


# ------------------------------------------------------------------------------------------------
# The concept file
# ------------------------------------------------------------------------------------------------


@dataclass
class EDLoRAFile:
    """The content of ``edlora.safetensors``."""

    words: list[str]
    tokens: dict[str, list[str]]
    embeddings: dict[str, torch.Tensor]  # word -> (layers, width)
    lora: dict[str, torch.Tensor]  # diffusers-style keys (unet./text_encoder. ... lora_A/lora_B.weight)
    layers: list[str]  # cross-attention module names, in token order
    metadata: dict[str, Any]  # base_model, rank, alpha, ... and the lora_adapter_metadata header


def save_edlora(path: Path, words: list[str], tokens: dict[str, list[str]], embeddings: dict[str, torch.Tensor],
                unet: nn.Module, text_encoder: nn.Module, layers: list[str], info: dict[str, Any]) -> Path:
    """Write the concept file atomically: embeddings, LoRA (diffusers keys + scales) and metadata."""
    from difflora.lora_io import ADAPTER_METADATA_KEY, _adapter_config, _atomic_save, collect_lora_layers

    tensors: dict[str, torch.Tensor] = {f"{EMBEDDING_PREFIX}{w}": embeddings[w].float() for w in words}
    adapter: dict[str, Any] = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        part = collect_lora_layers(model, component)
        for key, layer in part.items():
            tensors[f"{key}.lora_A.weight"] = layer.down
            tensors[f"{key}.lora_B.weight"] = layer.up
        if part:
            adapter.update({f"{component}.{k}": v for k, v in _adapter_config(part, component).items()})
    meta = {"concept_words": words, "tokens": tokens, "layers": layers, **info}
    _atomic_save(tensors, path, {"format": "pt", META_KEY: json.dumps(meta),
                                 ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True),
                                 "difflora_base_model": str(info.get("base_model", ""))})
    return path


def is_edlora_file(path: str | Path) -> bool:
    """Whether ``path`` (a file or a folder holding ``edlora.safetensors``) is an ED-LoRA file."""
    p = Path(path)
    p = p / EDLORA_FILE if p.is_dir() else p
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable files are reported by the LoRA reader
        return False


def load_edlora(path: str | Path) -> EDLoRAFile:
    """Read a concept file written by :func:`save_edlora`."""
    from safetensors import safe_open

    p = Path(path)
    p = p / EDLORA_FILE if p.is_dir() else p
    try:
        with safe_open(str(p), framework="pt") as f:
            header = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header[META_KEY])
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read ED-LoRA file '{p}' ({type(err).__name__}); re-train or re-copy it") from None
    words = list(meta["concept_words"])
    embeddings = {w: state.pop(f"{EMBEDDING_PREFIX}{w}") for w in words}
    header_meta = {k: v for k, v in header.items() if k != META_KEY}
    return EDLoRAFile(words=words, tokens={w: list(t) for w, t in meta["tokens"].items()}, embeddings=embeddings,
                      lora=state, layers=list(meta["layers"]), metadata={**meta, "header": header_meta})


def check_base_model(concept: EDLoRAFile, unet: nn.Module, text_encoder: nn.Module, source: str) -> None:
    """Refuse a concept file made for another base model (different layers or text width)."""
    layers = cross_attention_layers(unet)
    width = text_encoder.get_input_embeddings().weight.shape[1]
    emb = next(iter(concept.embeddings.values()))
    if concept.layers != layers or emb.shape != (len(layers), width):
        raise UserError(f"{source} was trained on another base model ({concept.metadata.get('base_model')!r}: "
                        f"{emb.shape[0]} cross-attention layers, text width {emb.shape[1]}; this model has "
                        f"{len(layers)} and {width}); use a concept trained on this base model")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def latent_mask(masks: list[torch.Tensor], size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, 1, h, w) pixel masks averaged down to the latent grid (a cell half covered weighs 0.5)."""
    return F.interpolate(torch.stack(masks), size=tuple(size), mode="area")


def _placeholder(text: str, cfg: EDLoRAConfig, source: str) -> str:
    if cfg.caption_placeholder not in text:
        raise UserError(f"{source} {text!r} has no {cfg.caption_placeholder!r}; write it where the concept "
                        "words go (or set --caption_placeholder)")
    return text.replace(cfg.caption_placeholder, " ".join(cfg.words))


def train(cfg: EDLoRAConfig) -> dict[str, Any]:
    """Train one ED-LoRA concept; return a summary (final loss, steps, output_dir, file)."""
    from diffusers.optimization import get_scheduler

    from difflora.data import load_image_set
    from difflora.models import LORA_TARGET_PRESETS, add_lora, load_base_model
    from difflora.train import checkpoint as ckpt
    from difflora.train.dreambooth import _draw, _encode_images, _example_generator
    from difflora.train.loss import diffusion_loss, target_for
    from difflora.train.outputs import prepare_output_dir
    from difflora.train.validation import pipeline_from, plot_loss, sample_grid, write_metrics

    # ---- set-up: output folder, model, tokens, LoRA ----------------------------------------------
    out = Path(cfg.output_dir)
    resume = ckpt.resolve_resume(out, cfg.resume_from_checkpoint) if out.exists() else None
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "latest" and resume is None:
        raise UserError(f"checkpoint '{cfg.resume_from_checkpoint}' does not exist")
    words, inits = cfg.words, cfg.initializers
    # Data before the slow model load: a bad folder or caption fails fast.
    images = load_image_set(cfg.instance_data_dir, cfg.instance_prompt, cfg.resolution, center_crop=cfg.center_crop,
                            random_flip=cfg.random_flip, captions=cfg.captions, seed=cfg.seed,
                            caption_dir=cfg.caption_dir, mask_dir=cfg.mask_dir)
    images.prompts = [_placeholder(p, cfg, f"caption of '{path.name}'") for p, path in zip(images.prompts,
                                                                                           images.paths)]
    val_prompts = [_placeholder(p.strip(), cfg, "validation prompt")
                   for p in (cfg.validation_prompt or cfg.instance_prompt).split("|") if p.strip()]
    prepare_output_dir(out, cfg.overwrite, resuming=resume is not None, result_name=EDLORA_FILE)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    base = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    if base.is_sdxl:
        raise UserError("ED-LoRA supports SD 1.x / 2.x base models; SDXL is not supported yet")
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoders[0], base.tokenizers[0]
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    layers = cross_attention_layers(unet)
    g = torch.Generator().manual_seed(cfg.seed)
    embedding, tokens = add_concept_tokens(tokenizer, text_encoder, words, inits, len(layers), cfg.init_std, g)
    torch.manual_seed(cfg.seed)  # LoRA A factors come from the global generator
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(cfg.rank)
    targets = LORA_TARGET_PRESETS["attention"]
    add_lora(unet, cfg.rank, alpha, targets["unet"])
    add_lora(text_encoder, cfg.rank, alpha, targets["text_encoder"])
    embedding.rows.requires_grad_(True)  # peft freezes every non-LoRA parameter it finds
    for module in (unet, vae, text_encoder):
        module.to(device)
    seq_len = tokenizer.model_max_length
    install_layerwise(unet, seq_len)

    # ---- optimizer: three groups, three learning rates -------------------------------------------
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps if cfg.scale_lr else 1
    groups = [
        {"params": [("text_encoder.concept_embeddings", embedding.rows)], "lr": cfg.embedding_lr * scale},
        {"params": [(f"text_encoder.{n}", p) for n, p in text_encoder.named_parameters()
                    if p.requires_grad and "lora_" in n], "lr": cfg.text_encoder_lr * scale},
        {"params": [(f"unet.{n}", p) for n, p in unet.named_parameters() if p.requires_grad],
         "lr": cfg.unet_lr * scale},
    ]
    trainable = {n: p for group in groups for n, p in group["params"]}
    try:
        options: dict[str, Any] = {"lr": cfg.unet_lr * scale, "weight_decay": cfg.adam_weight_decay}
        if "sgd" in cfg.optimizer:
            options["momentum"] = cfg.sgd_momentum
        else:
            options.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        if cfg.optimizer.startswith("scaled_") or cfg.optimizer == "peft_riemannian":
            options["reg"] = cfg.optimizer_reg
        optimizer = build_optimizer(cfg.optimizer, groups, **options)
    except (ValueError, ImportError, TypeError) as err:
        raise UserError(f"cannot build optimizer '{cfg.optimizer}': {err}") from None
    steps_per_epoch = math.ceil(len(images) / (cfg.train_batch_size * cfg.gradient_accumulation_steps))
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)

    identity = {"base_model": cfg.pretrained_model_name_or_path, "rank": cfg.rank, "concept_words": words,
                "optimizer": cfg.optimizer}
    step, losses, frozen_at = 0, [], None
    if resume is not None:
        state = ckpt.load_checkpoint(resume, trainable, optimizer, lr_scheduler, identity)
        step, losses, frozen_at = state["step"], state.get("losses", []), state.get("frozen_at")
        if step >= max_steps:
            raise UserError(f"checkpoint '{resume.name}' is already at step {step} >= max_train_steps "
                            f"{max_steps}; raise --max_train_steps to train further")
    if frozen_at is not None or (cfg.embedding_freeze_norm and embedding.mean_norm() >= cfg.embedding_freeze_norm):
        embedding.rows.requires_grad_(False)
        frozen_at = step if frozen_at is None else frozen_at

    def forward_loss(first_k: int) -> torch.Tensor:
        ks = [first_k + j for j in range(cfg.train_batch_size)]
        examples = [_draw(images, k) for k in ks]
        latents = _encode_images(vae, torch.stack([e.pixel_values for e in examples]),
                                 [_example_generator(cfg.seed, 0, k) for k in ks])
        gens = [_example_generator(cfg.seed, 10, k) for k in ks]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=gen) for gen in gens]).to(latents)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.stack(
                [torch.randn((latents.shape[1], 1, 1), generator=gen) for gen in gens]).to(latents)
        timesteps = torch.stack([torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (), generator=gen)
                                 for gen in gens]).to(device)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        cond = encode_layerwise(tokenizer, text_encoder, [e.prompt for e in examples], tokens, len(layers))
        pred = unet(noisy, timesteps, cond).sample
        mask = None
        if examples[0].mask is not None:
            mask = latent_mask([e.mask for e in examples], latents.shape[-2:]).to(device)
        target = target_for(base.noise_scheduler, latents, noise, timesteps)
        return diffusion_loss(pred, target, timesteps, base.noise_scheduler, cfg.snr_gamma, mask=mask).mean()

    seeds = list(range(cfg.num_validation_images))

    def validate(at_step: int) -> None:
        if cfg.num_validation_images <= 0:
            return
        pipe = LayerwisePipeline(pipeline_from(base, unet, [text_encoder], base.noise_scheduler.config),
                                 tokens, len(layers))
        sample_grid(pipe, val_prompts, seeds, cfg.resolution, cfg.validation_inference_steps,
                    cfg.validation_guidance, out / "samples" / f"step-{at_step}.png")

    if step == 0:
        validate(0)
    unet.train()
    text_encoder.train()
    bar = tqdm(total=max_steps, initial=step, desc="edlora", unit="step")
    t0 = time.perf_counter()
    try:
        while step < max_steps:
            step_loss = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                first_k = (step * cfg.gradient_accumulation_steps + micro) * cfg.train_batch_size
                loss = forward_loss(first_k)
                if not torch.isfinite(loss):
                    raise UserError(f"the loss became {loss.item()} at step {step + 1}; lower the learning rates")
                (loss / cfg.gradient_accumulation_steps).backward()
                step_loss += loss.item() / cfg.gradient_accumulation_steps
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in trainable.values() if p.grad is not None],
                                               cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            if frozen_at is None and cfg.embedding_freeze_norm and embedding.mean_norm() >= cfg.embedding_freeze_norm:
                embedding.rows.requires_grad_(False)  # no grad -> the optimizer leaves the rows alone
                frozen_at = step
                logger.info("embeddings frozen at step %d (mean norm %.3f)", step, embedding.mean_norm())
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", emb_norm=f"{embedding.mean_norm():.3f}")
            if step % cfg.checkpointing_steps == 0 and step < max_steps:
                ckpt.save_checkpoint(out, step, {n: p.detach() for n, p in trainable.items()}, optimizer,
                                     lr_scheduler, {**identity, "losses": losses, "frozen_at": frozen_at},
                                     cfg.checkpoints_total_limit)
            if cfg.validation_steps and step % cfg.validation_steps == 0 and step < max_steps:
                validate(step)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    # ---- outputs ----------------------------------------------------------------------------------
    validate(step)
    rows = embedding.rows.detach().cpu()
    embeddings = {w: rows[i * len(layers):(i + 1) * len(layers)] for i, w in enumerate(words)}
    info = {"base_model": cfg.pretrained_model_name_or_path, "rank": cfg.rank, "alpha": alpha, "steps": step,
            "optimizer": cfg.optimizer, "initializer": inits, "embeddings_frozen_at": frozen_at}
    path = save_edlora(out / EDLORA_FILE, words, tokens, embeddings, unet, text_encoder, layers, info)
    if losses:
        plot_loss(losses, out / "loss.png")
    summary = {"output_dir": str(out), "file": str(path), "steps": step, "final_loss": losses[-1] if losses else None,
               "seconds": seconds, "embedding_norm": embedding.mean_norm(), "embeddings_frozen_at": frozen_at,
               "tokens": sum(len(t) for t in tokens.values())}
    write_metrics(out / "metrics.json", {**summary, "losses": losses, "config": config_to_dict(cfg)})
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EDLoRAConfig, argv, prog="difflora edlora")
    summary = train(cfg)
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, wrote {summary['file']}")
