"""The README's main job: teach a base model the shipped concept and show the result.

``make demo`` runs this. It uses the pretrained toy Stable Diffusion in ``assets/toy-sd`` when the
project ships one and otherwise builds the offline tiny model, trains the checkered-star concept
with ``scaled_adamw``, and writes to ``outputs/demo/``: a grid of the concept in new contexts,
the loss curve, ``metrics.json`` with CLIP scores before and after training, and the LoRA files.
The demo folder is the demo's own: a rerun replaces its outputs (``--overwrite`` is implied).
It runs from any working directory: the shipped assets are found in the checkout or, in an
installed wheel, in the package's data (:func:`data_root`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from difflora.config import parse_config
from difflora.errors import UserError
from difflora.output_dir import Outputs, output_job, prepare_output_dir, safetensors_metadata


def data_root() -> Path:
    """Where ``assets/`` and ``configs/`` are: ``difflora/_data`` in an installed wheel, else the checkout."""
    packaged = Path(__file__).resolve().parent / "_data"
    return packaged if (packaged / "assets").is_dir() else Path(__file__).resolve().parents[1]


ROOT = data_root()
# What the demo writes itself; the DreamBooth run it starts writes (and replaces) its own outputs.
OUTPUTS = Outputs("demo", ("grid.png", "base-model"), recognise=lambda out: (
    "difflora_version" in safetensors_metadata(out / "pytorch_lora_weights.safetensors")
    or (out / "base-model" / "model_index.json").is_file()))


@dataclass
class DemoConfig:
    """Train the shipped concept on the offline model and write samples, loss and scores."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "where everything goes"})
    concept: str = field(default="checkered_star", metadata={"help": "a folder name under assets/concepts"})
    optimizer: str = field(default="scaled_adamw", metadata={"help": "any build_optimizer name"})
    learning_rate: float = field(default=1e-2, metadata={"help": "UNet LoRA learning rate (best scaled_adamw rate of the toy sweep)"})
    max_train_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    seed: int = field(default=0, metadata={"help": "seed of everything"})


def _base_model(out: Path) -> tuple[Path, Path]:
    """(model folder, CLIP folder): the shipped toy model, or a tiny one built offline."""
    toy, toy_clip = ROOT / "assets" / "toy-sd", ROOT / "assets" / "toy-clip"
    if (toy / "model_index.json").is_file() and (toy_clip / "config.json").is_file():
        return toy, toy_clip
    from difflora.tiny_models import make_tiny_model

    tiny = out / "base-model"
    if not (tiny / "model_index.json").is_file():
        shutil.rmtree(tiny, ignore_errors=True)
        make_tiny_model(tiny, seed=0)
    return tiny, tiny / "clip"


@output_job
def run_demo(cfg: DemoConfig) -> dict:
    from difflora.train.dreambooth import DreamBoothConfig, train

    concept_dir = ROOT / "assets" / "concepts" / cfg.concept
    meta_file = concept_dir / "concept.json"
    if not meta_file.is_file():
        names = sorted(p.name for p in (ROOT / "assets" / "concepts").iterdir() if (p / "concept.json").is_file())
        raise UserError(f"unknown concept '{cfg.concept}'; shipped concepts: {', '.join(names)}")
    meta = json.loads(meta_file.read_text())
    out = Path(cfg.output_dir)
    prepare_output_dir(out, OUTPUTS, overwrite=False, clear=False)  # a user's grid.png here is refused, not replaced
    model, clip = _base_model(out)
    resolution = 32 if model.name == "base-model" else int(
        json.loads((model / "vae" / "config.json").read_text()).get("sample_size", 32))
    argv = [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(concept_dir),
        "--instance_prompt", meta["instance_prompt"], "--captions", "--resolution", str(resolution),
        "--optimizer", cfg.optimizer, "--learning_rate", str(cfg.learning_rate),
        "--max_train_steps", str(cfg.max_train_steps), "--train_batch_size", "4", "--seed", str(cfg.seed),
        "--checkpointing_steps", str(max(1, cfg.max_train_steps // 2)), "--checkpoints_total_limit", "1",
        "--validation_prompt", " | ".join(meta["new_context_prompts"]), "--num_validation_images", "4",
        "--validation_inference_steps", "20", "--validation_guidance", "3.0", "--clip_model", str(clip),
        "--output_dir", str(out), "--overwrite",
        # diffusers' defaults that this run does not want, stated so they cannot change it
        "--lr_warmup_steps", "0", "--validation_epochs", "none", "--report_to", "none",
    ]
    summary = train(parse_config(DreamBoothConfig, argv))
    final_grid = out / "samples" / f"step-{summary['steps']}.png"
    if final_grid.is_file():
        shutil.copyfile(final_grid, out / "grid.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, argv, prog="difflora demo")
    summary = run_demo(cfg)
    metrics = summary.get("metrics", {})
    print(f"\ntrained '{cfg.concept}' for {summary['steps']} steps in {summary['seconds']:.0f} s "
          f"(final loss {summary['final_loss']:.4f})")
    for label in ("before", "after"):
        if label in metrics:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in metrics[label].items())
            print(f"  {label:6s}: {scores}")
    print(f"wrote {cfg.output_dir}/grid.png, loss.png, metrics.json and the LoRA files")
