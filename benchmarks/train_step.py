"""Time per training step and peak memory: difflora's DreamBooth trainer vs a bare loop.

The bare loop is the least a LoRA DreamBooth step can do: VAE encode, noise, UNet, MSE, backward,
torch AdamW, on the same model, LoRA targets and images. The trainer adds data augmentation,
per-example seeded randomness, the scaled optimizer, clipping, LR schedule and bookkeeping.
Each measurement runs in its own process (peak RSS is per process); runs are interleaved and
the median over repeats is reported.

    python benchmarks/train_step.py                 # tiny model and SD1.5-size UNet, CPU
    python benchmarks/train_step.py --only tiny     # the quick half
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "assets" / "concepts" / "checkered_star"

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def make_sd15_size_model(folder: Path) -> Path:
    """The SD1.5 UNet (random weights, published config) with a small 8x VAE and a 768-wide text encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from difflora.tiny_models import _scheduler, write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=1024,
                                        num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
                                        pad_token_id=len(tok) - 1))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        layers_per_block=1, sample_size=512)
    unet = UNet2DConditionModel(**SD15_UNET)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=_scheduler("epsilon"),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def worker_trainer(model: Path, resolution: int, steps: int, batch: int) -> float:
    from difflora.config import parse_config
    from difflora.train.dreambooth import DreamBoothConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(DreamBoothConfig, [
            "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(CONCEPT),
            "--instance_prompt", "a sks star", "--resolution", str(resolution), "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps), "--num_validation_images", "0",
            "--optimizer", "scaled_adamw", "--output_dir", tmp,
        ])
        return train(cfg)["seconds"] / steps


def worker_bare(model: Path, resolution: int, steps: int, batch: int) -> float:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from difflora.data import load_image_set

    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    images = load_image_set(CONCEPT, "a sks star", resolution, center_crop=True)
    pixels = torch.stack([images.example(i % len(images), 0).pixel_values for i in range(batch)])
    ids = tok(["a sks star"] * batch, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text(ids)[0]
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        pred = unet(sched.add_noise(latents, noise, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, is not inherited from the parent."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(kind: str, model: Path, resolution: int, steps: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--resolution", str(resolution),
           "--steps", str(steps), "--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["trainer", "bare"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", choices=["tiny", "sd15"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        fn = worker_trainer if args.worker == "trainer" else worker_bare
        per_step = fn(args.model, args.resolution, args.steps, args.batch)
        peak_mb = peak_rss_mb()
        print(json.dumps({"per_step": per_step, "peak_mb": peak_mb}))
        return

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "tiny"):
            from difflora.tiny_models import make_tiny_model

            cases.append(("tiny SD (32 px)", make_tiny_model(Path(tmp) / "tiny", with_eval_models=False), 32, 30, 4))
        if args.only in (None, "sd15"):
            cases.append(("SD1.5 UNet, 64x64 latents", make_sd15_size_model(Path(tmp) / "sd15"), 512, 3, 1))
        rows = []
        for name, model, res, steps, batch in cases:
            res_t, res_b = [], []
            for _ in range(args.repeats if "tiny" in name else max(1, args.repeats - 1)):
                res_t.append(run_worker("trainer", model, res, steps, batch))
                res_b.append(run_worker("bare", model, res, steps, batch))
            t = statistics.median(r["per_step"] for r in res_t)
            b = statistics.median(r["per_step"] for r in res_b)
            mt = statistics.median(r["peak_mb"] for r in res_t)
            mb = statistics.median(r["peak_mb"] for r in res_b)
            rows.append((name, batch, steps, len(res_t), t, b, mt, mb))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    print("| model | batch | steps | repeats | trainer s/step | bare s/step | ratio | trainer peak MB | bare peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, steps, reps, t, b, mt, mb in rows:
        print(f"| {name} | {batch} | {steps} | {reps} | {t:.4f} | {b:.4f} | {t / b:.3f} | {mt:.0f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
