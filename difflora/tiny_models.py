"""Tiny, seeded Stable Diffusion folders built offline from configs.

Tests, demos and benchmarks on a machine without a model hub need real diffusers / transformers
components that load through the normal ``from_pretrained`` code path. :func:`make_tiny_model`
writes such a folder: UNet, VAE, CLIP text encoder, a CLIP BPE tokenizer written on the fly and a
scheduler, in diffusers' layout, plus a matching tiny CLIP (``DIR/clip``) and DINO ViT
(``DIR/dino``) for the evaluation code. The same seed always gives the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from difflora.config import parse_config
from difflora.errors import UserError
from difflora.output_dir import Outputs, output_job, prepare_output_dir

# Words the tiny tokenizer encodes as single tokens; anything else falls back to characters.
_WORDS = (
    "a an the of in on at with and photo picture painting sketch pencil render drawing style "
    "sks dog cat man woman person toy car house tree bag shoe cup bowl robot teddy bear backpack "
    "red blue green yellow black white purple orange pink brown grey gray "
    "circle square triangle star ring cross shape shapes striped dotted checkered "
    "left right above below next to beside top bottom small large big background "
    "beach snow city forest street table sky water floor grass night"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(directory: str | Path, max_length: int = 77) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) to ``directory``.

    The vocabulary holds every byte symbol (with and without the end-of-word mark), the merges
    that build each word of a small fixed list, and CLIP's start / end tokens, so captions in
    plain words tokenize to few tokens and anything else still round-trips.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }))
    return directory


def _load_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(directory)


def _text_config(vocab_size: int, hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    cfg = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="quick_gelu",
    )
    if projection_dim is not None:
        cfg["projection_dim"] = projection_dim
    return CLIPTextConfig(**cfg)


def _unet(sdxl: bool, prediction_type: str, cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4), norm_num_groups=32, **extra,
    )


def _vae(resolution: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32,
        sample_size=resolution, layers_per_block=1,
    )


def tiny_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    # SD 1.5's published noise schedule.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def write_tiny_clip(directory: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny CLIPModel + CLIPProcessor for CLIP-T / CLIP-I tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    directory = Path(directory)
    tok_dir = write_clip_tokenizer(directory)
    tokenizer = _load_tokenizer(tok_dir)
    text = _text_config(len(tokenizer), 32, projection_dim=32)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32))
    model.save_pretrained(directory, safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def write_tiny_dino(directory: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny ViT in the layout of facebook/dino-vits16 (ViTModel + ViTImageProcessor)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    directory = Path(directory)
    torch.manual_seed(seed)
    model = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=image_size, patch_size=8),
        add_pooling_layer=False,
    )
    model.save_pretrained(directory, safe_serialization=True)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def make_tiny_model(
    directory: str | Path,
    sdxl: bool = False,
    seed: int = 0,
    prediction_type: str = "epsilon",
    resolution: int = 32,
    with_eval_models: bool = True,
) -> Path:
    """Write a complete tiny Stable Diffusion (or SDXL) folder that ``from_pretrained`` loads.

    ``resolution`` is the image size the model is meant for; the VAE downsamples by 2, so the
    UNet works on ``resolution // 2`` latents. ``with_eval_models`` adds ``clip/`` and ``dino/``.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    if resolution % 8:
        raise UserError(f"resolution must be a multiple of 8, got {resolution}")
    tok_dir = write_clip_tokenizer(directory / "tokenizer")
    tokenizer = _load_tokenizer(tok_dir)
    vocab = len(tokenizer)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(vocab, 32))
    torch.manual_seed(seed + 1)
    vae = _vae(resolution)
    torch.manual_seed(seed + 2)
    if sdxl:
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, 32, projection_dim=32))
        torch.manual_seed(seed + 3)
        unet = _unet(True, prediction_type, 64, resolution // 2)
        tokenizer_2 = _load_tokenizer(write_clip_tokenizer(directory / "tokenizer_2"))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=tiny_scheduler(prediction_type),
        )
    else:
        unet = _unet(False, prediction_type, 32, resolution // 2)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=tiny_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(directory, safe_serialization=True)
    if with_eval_models:
        write_tiny_clip(directory / "clip", image_size=resolution, seed=seed)
        write_tiny_dino(directory / "dino", image_size=resolution, seed=seed)
    return directory


# What make-tiny-model writes: what --overwrite replaces, and nothing else.
OUTPUTS = Outputs("make-tiny-model", ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                      "tokenizer_2", "scheduler", "feature_extractor", "safety_checker",
                                      "image_encoder", "clip", "dino"),
                  recognise=lambda out: (out / "model_index.json").is_file() and (out / "clip").is_dir()
                  and (out / "dino").is_dir())


@dataclass
class TinyModelConfig:
    """Write a tiny offline Stable Diffusion folder (diffusers layout) plus tiny CLIP and DINO."""

    output_dir: str = field(metadata={"help": "folder to write; must be empty or absent unless --overwrite"})
    sdxl: bool = field(default=False, metadata={"help": "write the SDXL variant (two text encoders)"})
    seed: int = field(default=0, metadata={"help": "weights seed; the same seed gives the same weights"})
    prediction_type: Literal["epsilon", "v_prediction"] = field(
        default="epsilon", metadata={"help": "what the UNet predicts (SD2-style models use v_prediction)"}
    )
    resolution: int = field(default=32, metadata={"help": "image size in pixels (multiple of 8)"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into a non-empty output_dir, replacing an earlier tiny model (other files are kept)"})


@output_job
def main(argv: list[str] | None = None) -> None:
    # A positional folder is accepted for convenience: `difflora make-tiny-model [--sdxl] DIR`.
    cfg = parse_config(TinyModelConfig, argv, prog="difflora make-tiny-model", positional="output_dir")
    out = Path(cfg.output_dir)
    prepare_output_dir(out, OUTPUTS, overwrite=cfg.overwrite, empty_unless_overwrite=True)
    make_tiny_model(out, sdxl=cfg.sdxl, seed=cfg.seed, prediction_type=cfg.prediction_type,
                    resolution=cfg.resolution)
    print(f"wrote tiny {'SDXL' if cfg.sdxl else 'SD'} model to {out}")
