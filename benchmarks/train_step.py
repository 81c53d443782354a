"""Time per training step and peak memory: difflora's DreamBooth trainer vs a bare loop.

The bare loop is the least a LoRA DreamBooth step can do: a VAE latent sample (the fixed batch's
posterior is encoded once, as the trainer does for images whose pixels cannot change), noise,
UNet, MSE, backward, torch AdamW, on the same model, LoRA targets and images. The trainer adds data augmentation,
per-example seeded randomness, the scaled optimizer, clipping, LR schedule, finiteness checks and
bookkeeping. Each process times every step on its own (the first ``--warmup`` steps are left out:
allocator warm-up, and compiling with ``--compile``); processes alternate trainer, bare, bare,
trainer, ... and the ratio is the median of all timed steps of each loop, so one slow step or one
slow process cannot decide it. ``--profile K`` instead runs torch.profiler over K steps of each
loop and prints the top ops by self CPU time and the trainer's extra ops.

    python benchmarks/train_step.py                          # tiny model and SD1.5-size UNet, CPU
    python benchmarks/train_step.py --only tiny              # the quick half
    python benchmarks/train_step.py --only tiny --compile    # both loops with the UNet compiled
    python benchmarks/train_step.py --only sd15 --profile 3  # where the trainer's extra time goes
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

    from difflora.tiny_models import tiny_scheduler, write_clip_tokenizer

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
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=tiny_scheduler("epsilon"),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def worker_trainer(model: Path, resolution: int, steps: int, batch: int, compile_unet: bool = False,
                   profile_from: int | None = None) -> tuple[list[float], dict | None]:
    """Seconds of each optimizer step of the DreamBooth trainer (and a profile of steps after ``profile_from``)."""
    from difflora.config import parse_config
    from difflora.train.dreambooth import DreamBoothConfig, train

    marks: list[float] = []
    prof = Profile(profile_from, steps)

    def tick(step: int, trainer: object) -> None:  # called before step 1 and after every step
        marks.append(time.perf_counter())
        prof.at(step)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(DreamBoothConfig, [
            "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(CONCEPT),
            "--instance_prompt", "a sks star", "--resolution", str(resolution), "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps), "--num_validation_images", "0",
            "--optimizer", "scaled_adamw", "--output_dir", tmp, *(["--compile"] if compile_unet else []),
        ])
        train(cfg, [tick])
    return [b - a for a, b in zip(marks, marks[1:])], prof.table


def worker_bare(model: Path, resolution: int, steps: int, batch: int, compile_unet: bool = False,
                profile_from: int | None = None) -> tuple[list[float], dict | None]:
    """Seconds of each step of the least a LoRA DreamBooth step can do (and a profile, as for the trainer)."""
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
    if compile_unet:  # as the trainer's --compile does it
        unet.forward = torch.compile(unet.forward, dynamic=False)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    images = load_image_set(CONCEPT, "a sks star", resolution, center_crop=True)
    pixels = torch.stack([images.example(i % len(images), 0).pixel_values for i in range(batch)])
    ids = tok(["a sks star"] * batch, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text(ids)[0]
        # The batch's pixels never change, so its VAE posterior is computed once and sampled every
        # step: the least work, and what the trainer does for images whose pixels cannot change.
        posterior = vae.encode(pixels).latent_dist
    prof = Profile(profile_from, steps)
    times = []
    for step in range(steps):
        prof.at(step)
        t0 = time.perf_counter()
        latents = posterior.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        pred = unet(sched.add_noise(latents, noise, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    prof.at(steps)
    return times, prof.table


class Profile:
    """torch.profiler over the steps after ``start`` (until ``stop``): self CPU time and calls per op."""

    def __init__(self, start: int | None, stop: int):
        self.start, self.stop, self.prof, self.table = start, stop, None, None

    def at(self, step: int) -> None:
        """Called with the number of steps done so far."""
        if self.start is None:
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.start()
        elif step == self.stop and self.prof is not None:
            self.prof.stop()
            self.table = {e.key: [e.self_cpu_time_total, e.count, getattr(e, "self_device_time_total", 0)]
                          for e in self.prof.key_averages()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, is not inherited from the parent."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(kind: str, model: Path, resolution: int, steps: int, batch: int, compile_unet: bool = False,
               profile_from: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--resolution", str(resolution),
           "--steps", str(steps), "--batch", str(batch)]
    cmd += (["--compile"] if compile_unet else []) + ([] if profile_from is None else ["--profile-from", str(profile_from)])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def profile_report(trainer: dict, bare: dict, steps: int, top: int) -> str:
    """Top ops by self CPU time of each loop, then what the trainer spends that the bare loop does not.

    Times and calls are per step. Under load the absolute times are noise, but calls per step and
    the ops that exist in one loop only are not.
    """
    def per_step(table: dict) -> dict[str, tuple[float, float]]:
        return {k: (v[0] / 1000 / steps, v[1] / steps) for k, v in table.items()}

    t, b = per_step(trainer), per_step(bare)
    out = []
    for name, table in (("trainer", t), ("bare loop", b)):
        total = sum(ms for ms, _ in table.values())
        out += [f"### {name}: top {top} ops by self CPU time ({total:.1f} ms/step in all ops)", "",
                "| op | self CPU ms/step | calls/step |", "|---|---|---|"]
        for k, (ms, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
            out.append(f"| `{k}` | {ms:.2f} | {n:g} |")
        out.append("")
    diff = {k: (t.get(k, (0, 0))[0] - b.get(k, (0, 0))[0], t.get(k, (0, 0))[1], b.get(k, (0, 0))[1])
            for k in set(t) | set(b)}
    out += [f"### trainer minus bare loop: top {top} ops by extra self CPU time", "",
            "| op | extra ms/step | trainer calls/step | bare calls/step |", "|---|---|---|---|"]
    for k, (ms, nt, nb) in sorted(diff.items(), key=lambda kv: -kv[1][0])[:top]:
        out.append(f"| `{k}` | {ms:+.2f} | {nt:g} | {nb:g} |")
    more = sorted(((k, v) for k, v in diff.items() if v[1] > v[2]), key=lambda kv: -(kv[1][1] - kv[1][2]))[:top]
    out += ["", f"### ops the trainer calls more often than the bare loop (top {top} by extra calls)", "",
            "| op | trainer calls/step | bare calls/step | extra ms/step |", "|---|---|---|---|"]
    out += [f"| `{k}` | {nt:g} | {nb:g} | {ms:+.2f} |" for k, (ms, nt, nb) in more]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["trainer", "bare"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, help="steps per process (default: 30 tiny, 4 sd15)")
    ap.add_argument("--warmup", type=int, help="first steps of each process left out (default: 5 tiny, 1 sd15)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", choices=["tiny", "sd15"])
    ap.add_argument("--repeats", type=int, default=5, help="processes of each loop, alternating (ABBA...)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet forward in both loops")
    ap.add_argument("--profile", type=int, metavar="K", help="profile K steps of each loop instead of timing")
    ap.add_argument("--top", type=int, default=15, help="rows of each profile table")
    ap.add_argument("--profile-from", type=int, help=argparse.SUPPRESS)  # worker: profile after this step
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        fn = worker_trainer if args.worker == "trainer" else worker_bare
        times, table = fn(args.model, args.resolution, args.steps, args.batch, args.compile, args.profile_from)
        print(json.dumps({"times": times, "peak_mb": peak_rss_mb(), "profile": table}))
        return
    if args.repeats < 1 or (args.profile is not None and args.profile < 1):
        ap.error("--repeats and --profile must be >= 1")

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "tiny"):
            from difflora.tiny_models import make_tiny_model

            cases.append(("tiny SD (32 px)", make_tiny_model(Path(tmp) / "tiny", with_eval_models=False), 32,
                          args.steps or 30, args.warmup if args.warmup is not None else 5, 4))
        if args.only in (None, "sd15"):
            cases.append(("SD1.5 UNet, 64x64 latents", make_sd15_size_model(Path(tmp) / "sd15"), 512,
                          args.steps or 4, args.warmup if args.warmup is not None else 1, 1))
        if args.profile is not None:
            for name, model, res, _, warmup, batch in cases:
                steps = warmup + args.profile
                tr = run_worker("trainer", model, res, steps, batch, args.compile, profile_from=warmup)
                ba = run_worker("bare", model, res, steps, batch, args.compile, profile_from=warmup)
                print(f"## Profile: {name}, batch {batch}, {args.profile} steps after {warmup} warm-up"
                      f"{', compiled' if args.compile else ''}\n")
                print(profile_report(tr["profile"], ba["profile"], args.profile, args.top) + "\n")
            return
        rows = []
        for name, model, res, steps, warmup, batch in cases:
            if steps <= warmup:
                ap.error(f"--steps ({steps}) must exceed --warmup ({warmup})")
            runs: dict[str, list[dict]] = {"trainer": [], "bare": []}
            for r in range(args.repeats):  # trainer, bare, bare, trainer, ...: neither always goes first
                for kind in (("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")):
                    runs[kind].append(run_worker(kind, model, res, steps, batch, args.compile))
            per_step = {k: [t for run in v for t in run["times"][warmup:]] for k, v in runs.items()}
            block = {k: [statistics.median(run["times"][warmup:]) for run in v] for k, v in runs.items()}
            t, b = statistics.median(per_step["trainer"]), statistics.median(per_step["bare"])
            rows.append((name, batch, steps - warmup, args.repeats, t, b, min(block["trainer"]) / min(block["bare"]),
                         statistics.median(r["peak_mb"] for r in runs["trainer"]),
                         statistics.median(r["peak_mb"] for r in runs["bare"])))
    mode = "compiled UNet" if args.compile else "eager"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, {mode}\n")
    print("| model | mode | batch | timed steps/process | processes | trainer s/step (median) | bare s/step (median) "
          "| ratio | ratio of best blocks | trainer peak MB | bare peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, steps, reps, t, b, best, mt, mb in rows:
        print(f"| {name} | {mode} | {batch} | {steps} | {reps} | {t:.4f} | {b:.4f} | {t / b:.3f} | {best:.3f} "
              f"| {mt:.0f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
