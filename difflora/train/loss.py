"""Prediction target and weighted MSE: the diffusion objective.

Kept apart from the loop so that DreamBooth and ED-LoRA training compute exactly the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type '{kind}'")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   snr_gamma: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example MSE (optionally masked), weighted by Min-SNR-gamma when ``snr_gamma`` is set.

    Min-SNR (Hang et al., 2023) caps the weight of easy low-noise steps at ``gamma / snr``; for
    v-prediction the weight is divided by ``snr + 1`` because the target already scales with it.
    Returns a vector of per-example losses so callers can split instance and prior terms.
    """
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        per_example = (err * mask).flatten(1).sum(1) / (mask.expand_as(err).flatten(1).sum(1) + 1e-8)
    else:
        per_example = err.flatten(1).mean(1)
    if snr_gamma:
        s = snr(scheduler, timesteps)
        weight = torch.minimum(s, torch.full_like(s, snr_gamma)) / s
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.minimum(s, torch.full_like(s, snr_gamma)) / (s + 1)
        per_example = per_example * weight
    return per_example
