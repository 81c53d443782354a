"""What a finished (or half-finished) run shows: sample grids, the loss curve, scores, a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from difflora.train.outputs import atomic_save_image, atomic_write_text


def pipeline_from(base, unet, text_encoders: list, scheduler_config: dict):
    """A sampling pipeline that shares the training modules (so the current LoRA is active)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(scheduler_config)
    if base.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
            tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=unet, scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=base.vae, text_encoder=text_encoders[0], tokenizer=base.tokenizers[0], unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seeds: list[int], resolution: int, steps: int, guidance: float,
                path: Path) -> list[list[Any]]:
    """Sample prompts x seeds, save a labelled grid to ``path`` and return the images."""
    from difflora.sampling import generate, make_grid

    modules = [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        rows = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, height=resolution,
                        width=resolution, progress=False)
    finally:
        for m, t in zip(modules, was_training):
            m.train(t)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(make_grid(rows, prompts, [f"seed {s}" for s in seeds]), path)
    return rows


def plot_loss(losses: list[float], path: Path) -> None:
    """Raw per-step loss and a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    k = max(1, len(losses) // 20)
    if len(losses) >= k > 1:
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")


def write_model_card(output_dir: Path, config: dict[str, Any], grid: str | None, final_loss: float | None) -> None:
    """A README.md that says what the LoRA is and exactly how it was trained."""
    base = config.get("pretrained_model_name_or_path")
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [lora, dreambooth, difflora, text-to-image]",
        "---",
        "",
        f"# DreamBooth LoRA for `{base}`",
        "",
        f"Trigger prompt: **{config.get('instance_prompt')}**",
        "",
        f"Trained with difflora's `{config.get('optimizer')}` optimizer, rank {config.get('rank')}, "
        f"{config.get('max_train_steps')} steps" + (f", final loss {final_loss:.4f}." if final_loss is not None else "."),
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        f"pipe = DiffusionPipeline.from_pretrained({base!r})",
        f"pipe.load_lora_weights({str(output_dir)!r})",
        f"image = pipe({config.get('validation_prompt') or config.get('instance_prompt')!r}).images[0]",
        "```",
        "",
    ]
    if grid:
        lines += ["## Samples", "", f"![samples]({grid})", ""]
    lines += ["## Hyperparameters", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    atomic_write_text(output_dir / "README.md", "\n".join(lines))
