"""Experiment trackers and the hub: what a run reports outside its output folder.

Trackers are accelerate's (``--report_to tensorboard|wandb|mlflow|...|all``, as in diffusers);
this module checks before any model loads that the tracker's package is installed, and sends the
things a scalar log cannot hold: sample grids as images, CLIP scores, the preconditioner's
condition numbers. ``--push_to_hub`` uploads the finished output folder at the very end; a push
that fails (offline, no token, no rights) keeps every trained file and ends with exit code 3.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from difflora.errors import PushFailed, UserError

logger = logging.getLogger(__name__)

# --report_to name -> (import name, pip name) of the package accelerate needs for it.
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
# Optional optimizer packages: optimizer name -> (import name, pip name).
OPTIMIZER_PACKAGES: dict[str, tuple[str, str]] = {
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
}
# Left out of a hub upload: resumable checkpoints, tracker logs and difflora's hidden files.
HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".*", "logs/**"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_optional_packages(cfg: Any) -> None:
    """Refuse a tracker or optimizer whose package is missing: one line naming the pip install.

    Runs in ``validate()``, so the message comes before any model or data is loaded.
    """
    report_to = getattr(cfg, "report_to", "none")
    if report_to in TRACKER_PACKAGES:
        module, pip_name = TRACKER_PACKAGES[report_to]
        if not _installed(module):
            raise UserError(f"--report_to {report_to} needs the {pip_name} package: pip install {pip_name} "
                            "(or --report_to none)")
    if report_to == "wandb" and getattr(cfg, "hub_token", None):
        raise UserError("--report_to wandb with --hub_token would expose the token in the run's logged config; "
                        "log in with `hf auth login` and drop --hub_token")
    optimizer = getattr(cfg, "optimizer", "")
    if optimizer in OPTIMIZER_PACKAGES:
        module, pip_name = OPTIMIZER_PACKAGES[optimizer]
        if not _installed(module):
            flag = "--use_8bit_adam" if getattr(cfg, "use_8bit_adam", False) else f"--optimizer {optimizer}"
            raise UserError(f"{flag} needs the {pip_name} package: pip install {pip_name}")


def tracked_config(cfg: Any) -> dict[str, Any]:
    """The run's options as tracker hyper-parameters: plain scalars only, the hub token never."""
    from difflora.config import config_to_dict

    return {k: v for k, v in config_to_dict(cfg).items()
            if isinstance(v, (int, float, str, bool)) and k != "hub_token"}


def log_image(accelerator: Any, tag: str, path: Path, step: int) -> None:
    """Send the image file at ``path`` (a labelled sample grid) to every tracker that takes images."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, array, global_step=step, dataformats="HWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({tag: [wandb.Image(array, caption=f"step {step}")]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(array, f"{tag.replace('/', '_')}-step-{step}.png")
        except Exception as err:  # noqa: BLE001 - a tracker failing must not stop training
            logger.warning("could not send %s to %s: %s", tag, tracker.name, err)


def flat_scores(metrics: dict[str, Any], prefix: str = "scores") -> dict[str, float]:
    """Nested score dicts (``{"before": {"clip_t": 0.3}}``) as flat tracker scalars."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flat_scores(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def push_to_hub(folder: Path, repo_id: str | None, token: str | None = None) -> str:
    """Upload ``folder`` (checkpoints and logs left out) to the hub model repo ``repo_id``; return its URL.

    Any failure (offline, no token, no rights, no network) becomes :class:`PushFailed` naming the
    cause and the command that retries the upload; the folder itself is never touched.
    """
    repo_id = repo_id or Path(folder).resolve().name
    try:
        from huggingface_hub import create_repo, upload_folder

        repo = create_repo(repo_id=repo_id, exist_ok=True, token=token).repo_id
        upload_folder(repo_id=repo, folder_path=str(folder), commit_message="End of training",
                      ignore_patterns=HUB_IGNORE, token=token)
    except Exception as err:  # noqa: BLE001 - every hub failure ends the same way: files kept, one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PushFailed(f"training finished and its files are in '{folder}', but pushing to the hub repo "
                         f"'{repo_id}' failed ({type(err).__name__}: {first}); retry with: hf upload {repo_id} "
                         f"{folder} --exclude 'checkpoint-*' 'logs/*'") from None
    url = f"https://huggingface.co/{repo}"
    logger.info("pushed %s to %s", folder, url)
    return url
