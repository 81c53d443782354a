"""What a finished (or half-finished) run shows: sample grids, the loss curve, scores, a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from difflora.output_dir import atomic_save_image, atomic_write_text


def pipeline_from(base, unet, text_encoders: list, scheduler_config: dict):
    """A sampling pipeline that shares the training modules (so the current LoRA is active).

    The modules may differ in dtype (fp16/bf16 UNet, fp32 VAE, LoRA factors and trained embedding
    rows): the UNet and the VAE decoder take inputs of any dtype, and peft runs each LoRA factor in
    its own dtype.
    """
    from diffusers import DDIMScheduler

    decode_in_vae_dtype(base.vae)
    unet_inputs_in_unet_dtype(unet)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    pipe = base.family.pipeline(vae=base.vae, unet=unet, text_encoders=text_encoders, tokenizers=base.tokenizers,
                                scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_in_vae_dtype(vae) -> None:
    """Make the VAE decoder cast its input to the VAE's own dtype (installed once per VAE).

    Under mixed precision the UNet and text encoders hold fp16/bf16 weights while the VAE stays fp32
    (it overflows in fp16), and a diffusers pipeline hands the VAE latents in the UNet's dtype.
    """
    if getattr(vae, "_difflora_decode_cast", False):
        return

    def cast(module: torch.nn.Module, args: tuple) -> tuple:
        dtype = next(module.parameters()).dtype
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for module in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None)):
        if module is not None:
            module.register_forward_pre_hook(cast)
    vae._difflora_decode_cast = True


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def unet_inputs_in_unet_dtype(unet) -> None:
    """Make the UNet cast its latents and conditioning to its own dtype (installed once per UNet).

    A pipeline takes its latents' dtype from the prompt embeddings; those are fp32 when trainable
    fp32 rows (ED-LoRA's concept tokens) sit in a frozen fp16 text encoder. The timestep is left as
    it is. A no-op when the dtypes already agree, as they do in the training loop.
    """
    if getattr(unet, "_difflora_input_cast", False):
        return

    def cast(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        dtype = module.dtype  # the frozen weights' dtype (conv_in's, the first parameter)
        # forward(sample, timestep, encoder_hidden_states, ...): all but the timestep.
        args = tuple(_cast_floats(a, dtype) if i in (0, 2) else a for i, a in enumerate(args))
        return args, {k: (v if k == "timestep" else _cast_floats(v, dtype)) for k, v in kwargs.items()}

    unet.register_forward_pre_hook(cast, with_kwargs=True)
    unet._difflora_input_cast = True


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
                        width=resolution, progress=True)  # a bar of its own: grids take a while
    finally:
        for m, t in zip(modules, was_training):
            m.train(t)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(make_grid(rows, prompts, [f"seed {s}" for s in seeds]), path)
    return rows


def plot_loss(losses: list[float], path: Path) -> None:
    """Raw per-step loss and a moving average (matplotlib's Figure API: no pyplot, no global
    backend switch in the caller's process)."""
    from matplotlib.figure import Figure

    from difflora.output_dir import atomic_write

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
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
    atomic_write(path, fig.savefig)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")


def write_model_card(output_dir: Path, config: dict[str, Any], grid: str | None, final_loss: float | None,
                     license: str | None = None) -> None:
    """A README.md that says what the LoRA is and exactly how it was trained.

    The metadata is huggingface_hub's ``ModelCardData``: ``base_model`` only when it is a hub id (a
    local folder is not a valid Hub reference; the text names it), the family's ``license``, the
    ``instance_prompt``. The code snippet uses the first validation prompt, not the '|'-joined list.
    """
    from huggingface_hub import ModelCardData

    base = str(config.get("pretrained_model_name_or_path"))
    prompt = config.get("instance_prompt")
    first_prompt = ((config.get("validation_prompt") or "").split("|")[0].strip()) or prompt
    data = ModelCardData(base_model=None if Path(base).exists() else base, license=license,
                         library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["lora", "dreambooth", "difflora", "text-to-image"], instance_prompt=prompt)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# DreamBooth LoRA for `{base}`",
        "",
        f"Trigger prompt: **{prompt}**",
        "",
        f"Trained with difflora's `{config.get('optimizer')}` optimizer, rank {config.get('rank')}, "
        f"{config.get('max_train_steps')} steps" + (f", final loss {final_loss:.4f}." if final_loss is not None else "."),
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        f"pipe = DiffusionPipeline.from_pretrained({base!r})",
        f"pipe.load_lora_weights({str(output_dir)!r})",
        f"image = pipe({first_prompt!r}).images[0]",
        "```",
        "",
    ]
    if grid:
        lines += ["## Samples", "", f"![samples]({grid})", ""]
    lines += ["## Hyperparameters", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    atomic_write_text(output_dir / "README.md", "\n".join(lines))
