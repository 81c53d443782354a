"""Train-step and optimizer-step times on one GPU: SD1.5 and SDXL UNets, difflora's trainer vs a bare loop.

    python benchmarks/gpu.py                          # one GPU, under 5 minutes: writes benchmarks/results/gpu.md
    python benchmarks/gpu.py --compile                # adds torch.compile'd bare-loop cells; compiling takes
                                                      # minutes, so the time budget becomes 900 s
    python benchmarks/gpu.py --smoke --output X.md    # tiny configs on whatever device there is (CPU: 1 thread)

The UNets are built from the published configs of runwayml/stable-diffusion-v1-5 (512 px images,
64x64 latents) and stabilityai/stable-diffusion-xl-base-1.0 (1024 px, 128x128 latents) with random
weights; nothing is downloaded. The VAE and text encoders are small stand-ins with the real
interfaces (8x VAE with 4 latent channels; text widths 768, and 768 + 1280 with a pooled
projection for SDXL), so every step does the same work in the UNet as the real models.

Each cell is one (model, dtype, batch, gradient checkpointing) combination, run twice:

* trainer: the whole ``difflora.train.dreambooth.train`` job from a model folder on disk (images,
  VAE encode, noise, UNet, loss, ScaledAdamW with clipping and LR schedule, bookkeeping). Step
  times are taken between consecutive optimizer steps (a global step hook that synchronizes).
* bare: the least a LoRA DreamBooth step can do on the same folder: VAE encode of a fixed batch,
  noise, UNet under autocast, MSE, backward, torch AdamW (GradScaler in fp16).

The trainer encodes each image once and keeps its VAE posterior when its pixels cannot change
between draws (no flips, a crop with no freedom: the case for these images), so it does less
per step than the bare loop, which encodes every step; the difference is the VAE encoder's share.

Both adapt the same modules (to_q, to_k, to_v, to_out.0, rank 4), keep the frozen weights in the
cell's dtype and the LoRA factors in fp32. Times are medians over steps after warm-up, with
``torch.cuda.synchronize`` around each; peak memory is ``torch.cuda.max_memory_allocated`` over
the timed steps (peak RSS on a CPU). Each dtype runs in its own process (accelerate fixes the
mixed precision once per process). A cell that runs out of memory is skipped and marked so;
cells not started within ``--time-budget`` seconds are marked "skipped: time budget".

The optimizer table times one step of torch AdamW, difflora's ScaledAdamW and peft's Riemannian
AdamW on the LoRA factors of the SD1.5 UNet's attention layers at ranks 4, 16 and 64 (interleaved,
medians after warm-up).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.optimizer_overhead import UNET_TARGETS, FactorHolder, make_factors, params_with_grads  # noqa: E402
from benchmarks.train_step import CONCEPT, peak_rss_mb  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "gpu.md"
NOT_MEASURED = ("not measured: no GPU was available when this table was committed; "
                "run `python benchmarks/gpu.py` on one GPU")
PROMPT = "a sks star"
RANK = 4  # the trainer's default LoRA rank; alpha = rank in both loops

# unet/config.json of runwayml/stable-diffusion-v1-5 (bookkeeping keys starting with "_" left out).
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (bookkeeping keys left out).
SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Smoke mode: the same layouts, shrunk (two levels, 32/64 channels, 4x4 latents).
TINY_SD15_UNET_CONFIG = {
    **SD15_UNET_CONFIG, "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
    "attention_head_dim": 4, "sample_size": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_SDXL_UNET_CONFIG = {
    **SDXL_UNET_CONFIG, "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 64,
    "attention_head_dim": [2, 4], "transformer_layers_per_block": [1, 2], "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


@dataclass(frozen=True)
class ModelSpec:
    """A UNet config plus the stand-in components and image size it is trained at."""

    name: str
    unet: dict
    resolution: int
    text_widths: tuple[int, ...]  # one text encoder (SD) or two, the second pooled and projected (SDXL)
    warmup: int
    steps: int

    @property
    def sdxl(self) -> bool:
        return len(self.text_widths) == 2

    @property
    def latent(self) -> int:
        return self.resolution // 8


FULL_MODELS = (
    ModelSpec("SD1.5", SD15_UNET_CONFIG, 512, (768,), warmup=3, steps=8),
    ModelSpec("SDXL", SDXL_UNET_CONFIG, 1024, (768, 1280), warmup=2, steps=5),
)
SMOKE_MODELS = (
    ModelSpec("SD1.5", TINY_SD15_UNET_CONFIG, 32, (32,), warmup=1, steps=1),
    ModelSpec("SDXL", TINY_SDXL_UNET_CONFIG, 32, (32, 32), warmup=1, steps=1),
)
DTYPES = ("fp16", "bf16")
BATCHES = (1, 4)
RANKS = (4, 16, 64)
TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---- measuring -------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: "5" resets this process's peak RSS (VmHWM) to the current RSS
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def read_peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- model folders ---------------------------------------------------------------------------------

def write_model(folder: Path, spec: ModelSpec, device: torch.device) -> Path:
    """A diffusers folder: the spec's UNet (random, stored fp16) with stand-in VAE and text encoders."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from difflora.tiny_models import write_clip_tokenizer

    cfg = spec.unet
    assert sum(spec.text_widths) == cfg["cross_attention_dim"], spec.name
    if spec.sdxl:
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        assert spec.text_widths[-1] == pooled, spec.name
    names = ("tokenizer", "tokenizer_2")[:len(spec.text_widths)]
    tokenizers = [CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / n)) for n in names]
    vocab = len(tokenizers[0])
    torch.manual_seed(0)
    encoders = []
    for i, width in enumerate(spec.text_widths):
        text_cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=2, num_attention_heads=width // 64 or 4, projection_dim=width,
                                  max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                  pad_token_id=vocab - 1)
        last_of_two = spec.sdxl and i == 1
        encoders.append(CLIPTextModelWithProjection(text_cfg) if last_of_two else CLIPTextModel(text_cfg))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        layers_per_block=1, sample_size=spec.resolution,
                        scaling_factor=0.13025 if spec.sdxl else 0.18215)
    with torch.device(device):  # random init of billions of weights is seconds on a GPU, minutes on a CPU
        unet = UNet2DConditionModel.from_config(cfg)
    unet = unet.half().cpu()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    if spec.sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    del pipe, unet
    free_memory(device)
    return folder


def unet_params(cfg: dict) -> int:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
    return sum(p.numel() for p in unet.parameters())


# ---- bare loop -------------------------------------------------------------------------------------

class BareModel:
    """The folder's components on the device, LoRA on the UNet, prompt conditioning computed once."""

    def __init__(self, folder: Path, spec: ModelSpec, dtype: str, device: torch.device) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        wdtype = TORCH_DTYPE[dtype]
        self.spec, self.device, self.dtype = spec, device, wdtype
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False).to(device)
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        torch.manual_seed(0)
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=list(UNET_TARGETS)))
        self.unet.to(device, wdtype)
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        subfolders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))[:len(spec.text_widths)]
        states, pooled = [], None
        self.encoders = []
        with torch.no_grad():
            for i, (tok_dir, enc_dir) in enumerate(subfolders):
                cls = CLIPTextModelWithProjection if spec.sdxl and i == 1 else CLIPTextModel
                tok = CLIPTokenizer.from_pretrained(folder, subfolder=tok_dir)
                enc = cls.from_pretrained(folder, subfolder=enc_dir).requires_grad_(False).to(device, wdtype)
                self.encoders.append(enc)
                ids = tok([PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
                out = enc(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2] if spec.sdxl else out[0])
                pooled = out[0]
        self.cond = torch.cat(states, dim=-1)
        self.pooled = pooled
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]


def run_bare(model: BareModel, batch: int, gc_on: bool, compiled: bool) -> dict:
    """Median step time and peak memory of the bare loop at one batch size."""
    from difflora.data import load_image_set

    device, dtype, spec = model.device, model.dtype, model.spec
    unet = model.unet
    if gc_on:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    forward = torch.compile(unet) if compiled else unet
    images = load_image_set(CONCEPT, PROMPT, spec.resolution, center_crop=True)
    pixels = torch.stack([images.example(i % len(images), 0).pixel_values for i in range(batch)]).to(device)
    cond = model.cond.expand(batch, -1, -1)
    added = None
    if spec.sdxl:
        r = spec.resolution
        added = {"text_embeds": model.pooled.expand(batch, -1),
                 "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=dtype, device=device)}
    # Autocast and loss scaling as accelerate sets them up for the trainer (no autocast for fp16 on a CPU).
    autocast = not (device.type == "cpu" and dtype == torch.float16)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)
    opt = torch.optim.AdamW(model.trainable, lr=1e-4, weight_decay=1e-2)
    n_timesteps = model.scheduler.config.num_train_timesteps
    times, peak = [], 0.0
    unet.train()
    try:
        for i in range(spec.warmup + spec.steps):
            if i == spec.warmup:
                reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                latents = model.vae.encode(pixels).latent_dist.sample() * model.vae.config.scaling_factor
            latents = latents.to(dtype)
            noise = torch.randn_like(latents)
            t = torch.randint(0, n_timesteps, (batch,), device=device)
            noisy = model.scheduler.add_noise(latents, noise, t)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                pred = forward(noisy, t, cond, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= spec.warmup:
                times.append(time.perf_counter() - t0)
        peak = read_peak_mib(device)
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
    return {"s_per_step": statistics.median(times), "peak_mib": peak, "timed_steps": len(times)}


# ---- trainer ---------------------------------------------------------------------------------------

def run_trainer(folder: Path, spec: ModelSpec, dtype: str, batch: int, gc_on: bool, device: torch.device) -> dict:
    """Run difflora's DreamBooth job; time the steps between consecutive optimizer steps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from difflora.config import parse_config
    from difflora.train.dreambooth import DreamBoothConfig, train

    total = spec.warmup + spec.steps
    stamps: list[float] = []
    counted: list[int] = []
    peak: dict[str, float] = {}

    def after_step(opt, args, kwargs) -> None:
        # One stamp per training step: only the first optimizer object seen counts (accelerate's
        # wrapper, or an optimizer stepping an inner one, would otherwise stamp twice).
        if type(opt).__module__.startswith("accelerate") or stamps and id(opt) != counted[0]:
            return
        if not stamps:
            counted.append(id(opt))
        sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) == spec.warmup:
            reset_peak(device)
        elif len(stamps) == total:
            peak["mib"] = read_peak_mib(device)

    handle = register_optimizer_step_post_hook(after_step)
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = parse_config(DreamBoothConfig, [
                "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(CONCEPT),
                "--instance_prompt", PROMPT, "--resolution", str(spec.resolution),
                "--train_batch_size", str(batch), "--max_train_steps", str(total),
                "--checkpointing_steps", str(10 * total), "--num_validation_images", "0",
                "--mixed_precision", dtype, f"--gradient_checkpointing={str(gc_on).lower()}",
                "--rank", str(RANK), "--lora_targets", "attention", "--optimizer", "scaled_adamw",
                "--output_dir", out,
            ])
            summary = train(cfg)
    finally:
        handle.remove()
    if len(stamps) < 2:  # an optimizer that runs no step hooks: fall back on the trainer's own clock
        return {"s_per_step": summary["seconds"] / summary["steps"], "peak_mib": read_peak_mib(device),
                "timed_steps": summary["steps"], "note": "trainer: mean over all steps, warm-up included"}
    # The last `steps` intervals between optimizer steps. When the fp16 loss scaler skips a step
    # (no optimizer step, so no stamp) one interval spans two steps; the median absorbs a few.
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][-spec.steps:]
    out = {"s_per_step": statistics.median(intervals), "peak_mib": peak.get("mib") or read_peak_mib(device),
           "timed_steps": len(intervals)}
    if len(stamps) != total:
        out["note"] = ("trainer: the fp16 loss scaler skipped optimizer steps in some cells; their time is the "
                       "median of the last intervals between optimizer steps")
    return out


# ---- optimizer step --------------------------------------------------------------------------------

def attention_targets(unet_config: dict) -> list[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every attention projection LoRA adapts in the UNet."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    return [(f"unet.{n}", m.in_features, m.out_features) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(UNET_TARGETS)]


def bench_optimizers(unet_config: dict, rank: int, warmup: int, repeats: int, device: torch.device) -> dict:
    from difflora.optim import DEFAULT_REG, build_optimizer

    values, grads = make_factors(attention_targets(unet_config), rank)
    values = {n: v.to(device) for n, v in values.items()}
    grads = {n: g.to(device) for n, g in grads.items()}
    common = {"lr": 1e-4, "weight_decay": 1e-2}
    holder = FactorHolder(values)
    peft_params = list(holder.named_parameters())
    for n, p in peft_params:
        p.grad = grads[n].clone()
    opts = {
        "AdamW": build_optimizer("adamw", params_with_grads(values, grads), **common),
        "AdamW fused": torch.optim.AdamW([p for _, p in params_with_grads(values, grads)], fused=True, **common),
        "ScaledAdamW": build_optimizer("scaled_adamw", params_with_grads(values, grads), reg=DEFAULT_REG, **common),
        "peft Riemannian": build_optimizer("peft_riemannian", peft_params, model=holder, reg=DEFAULT_REG, **common),
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(warmup + repeats):
        for name, opt in opts.items():
            if name == "peft Riemannian":  # peft rewrites .grad in place: restore it outside the timing
                for n, p in peft_params:
                    p.grad.copy_(grads[n])
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out.update(rank=rank, params=sum(v.numel() for v in values.values()), tensors=len(values))
    return out


# ---- worker process: one dtype, every model, batch and checkpointing setting -----------------------

def worker(job: dict) -> None:
    device = torch.device(job["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    deadline = job["deadline"]
    results = Path(job["results"])

    def emit(record: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")

    for spec_dict, folder in zip(job["specs"], job["folders"]):
        spec = ModelSpec(**{**spec_dict, "text_widths": tuple(spec_dict["text_widths"])})
        folder = Path(folder)
        for loop in job["loops"]:
            cells = [(b, g) for b in BATCHES for g in (False, True) if not (loop == "bare+compile" and g)]
            model = None
            for batch, gc_on in cells:
                key = {"kind": "train", "model": spec.name, "dtype": job["dtype"], "batch": batch, "gc": gc_on,
                       "loop": loop}
                if time.time() > deadline:
                    emit({**key, "status": "skipped: time budget"})
                    continue
                t0 = time.time()
                try:
                    if loop == "trainer":
                        res = run_trainer(folder, spec, job["dtype"], batch, gc_on, device)
                    else:
                        if model is None:
                            model = BareModel(folder, spec, job["dtype"], device)
                        res = run_bare(model, batch, gc_on, compiled=loop == "bare+compile")
                    emit({**key, "status": "ok", **res, "cell_s": time.time() - t0})
                except Exception as err:  # noqa: BLE001 - one failing cell must not lose the table
                    status = "skipped: out of memory" if is_oom(err) else \
                        f"error: {type(err).__name__}: {str(err).strip().splitlines()[0][:120] if str(err).strip() else ''}"
                    emit({**key, "status": status})
                    print(f"{key}: {status}", file=sys.stderr, flush=True)
                if loop == "bare+compile":
                    torch._dynamo.reset()
                free_memory(device)
                print(f"{spec.name} {job['dtype']} batch {batch} gc {gc_on} {loop}: {time.time() - t0:.1f} s",
                      file=sys.stderr, flush=True)
            del model
            free_memory(device)


def run_workers(jobs: list[dict], stop_at: float, parallel: bool) -> list[str]:
    """Run worker processes (all at once, or one after another); return what went wrong, if anything.

    Each job writes its cells to ``job["results"]`` as it goes, so a worker that crashes or is
    stopped at ``stop_at`` (a time.time()) keeps what it measured. Output goes to ``job["log"]``.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    failures = []

    def start(job):
        with open(job["log"], "a") as log:
            return subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(job)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)

    def finish(job, proc) -> None:
        try:
            rc = proc.wait(timeout=max(1.0, stop_at - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            failures.append(f"{job['name']}: stopped at the time limit")
            return
        if rc:
            lines = [ln for ln in Path(job["log"]).read_text().splitlines() if ln.strip()]
            failures.append(f"{job['name']}: worker exited with {rc}: {lines[-1][:200] if lines else ''}")

    if parallel:
        for job, proc in [(job, start(job)) for job in jobs]:
            finish(job, proc)
    else:
        for job in jobs:
            finish(job, start(job))
            print(f"{job['name']}: done", file=sys.stderr, flush=True)
    return failures


# ---- the table ---------------------------------------------------------------------------------------

SHORT_STATUS = {"skipped: out of memory": "skipped (OOM)", "skipped: time budget": "skipped (time budget)"}


def fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def render(meta: dict, cells: list[dict], optim: list[dict], note: str | None = None) -> str:
    gpu = meta["device_type"] == "cuda"
    mem = "peak GiB (max allocated)" if gpu else "peak MiB (RSS)"
    to_mem = (lambda mib: fmt(mib / 1024, 2)) if gpu else (lambda mib: fmt(mib, 0))
    lines = [
        "# Train step and optimizer step on one GPU" if meta["mode"] == "full"
        else "# Train step and optimizer step (smoke: tiny configs)",
        "",
        f"`{meta['command']}`" + (f" on {meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}, "
                                   f"peft {meta['peft']}; {meta['wall_s']:.0f} s in all." if "torch" in meta else ""),
        "",
        "UNets built from the published configs with random weights: "
        + "; ".join(f"{m['name']} {m['params'] / 1e6:,.0f}M parameters, {m['resolution']} px -> "
                    f"{m['latent']}x{m['latent']} latents" for m in meta["models"])
        + ". Small stand-in VAE (8x, 4 latent channels) and text encoders of the real widths. "
        "LoRA rank 4 on to_q, to_k, to_v, to_out.0 in both loops; frozen weights in the row's dtype, "
        "LoRA factors fp32.",
        "",
        "**trainer**: the full `difflora.train.dreambooth.train` job (images from disk, VAE encode, UNet, "
        "loss, ScaledAdamW, clipping, LR schedule, bookkeeping), not a step on cached latents; time between "
        "consecutive optimizer steps. **bare**: VAE encode of a fixed batch, noise, UNet under autocast, MSE, "
        "backward, torch AdamW (GradScaler in fp16); so trainer / bare includes the preconditioner. "
        "**bare + compile**: the bare loop with `torch.compile(unet)`, without checkpointing, only with "
        "`--compile` (- where not run). Medians over "
        + ", ".join(f"{m['steps']} timed steps after {m['warmup']} warm-up ({m['name']})" for m in meta["models"])
        + f", synchronized; {mem.split(' (')[0]} over the timed steps.",
        "",
        f"| model | dtype | batch | grad ckpt | trainer s/step | bare s/step | trainer / bare | trainer {mem} "
        f"| bare {mem} | bare + compile s/step |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    if note:
        lines += ["", note]
    by_key = {(c["model"], c["dtype"], c["batch"], c["gc"], c["loop"]): c for c in cells}
    for m in meta["models"]:
        for dtype in DTYPES:
            for batch in BATCHES:
                for gc_on in (False, True):
                    row = {loop: by_key.get((m["name"], dtype, batch, gc_on, loop))
                           for loop in ("trainer", "bare", "bare+compile")}
                    if not any(row.values()):
                        continue

                    def value(loop, key, f, row=row, gc_on=gc_on):
                        c = row[loop]
                        if c is None:
                            return "n/a" if loop == "bare+compile" and gc_on else "-"
                        return f(c[key]) if c["status"] == "ok" else SHORT_STATUS.get(c["status"], "error (below)")

                    t, b = row["trainer"], row["bare"]
                    ratio = fmt(t["s_per_step"] / b["s_per_step"], 3) if t and b and t["status"] == b["status"] == "ok" \
                        else "-"
                    lines.append(
                        f"| {m['name']} | {dtype} | {batch} | {'on' if gc_on else 'off'} "
                        f"| {value('trainer', 's_per_step', lambda x: fmt(x, 4))} "
                        f"| {value('bare', 's_per_step', lambda x: fmt(x, 4))} | {ratio} "
                        f"| {value('trainer', 'peak_mib', to_mem)} | {value('bare', 'peak_mib', to_mem)} "
                        f"| {value('bare+compile', 's_per_step', lambda x: fmt(x, 4))} |")
    errors = sorted({c["status"] for c in cells if c["status"].startswith("error")})
    notes = sorted({c["note"] for c in cells if c.get("note")})
    if errors or notes or meta.get("failures"):
        lines.append("")
        lines += [f"- {e.replace('|', '/')}" for e in errors + notes + meta.get("failures", [])]
    lines += [
        "",
        "## Optimizer step",
        "",
        f"One step on the LoRA factors of the {meta['models'][0]['name']} UNet's attention layers "
        "(to_q, to_k, to_v, to_out.0), fp32 on the device, random gradients; torch AdamW (default implementation "
        "and `fused=True`, the kernel ScaledAdamW runs), "
        "difflora's ScaledAdamW and peft's Riemannian AdamW (`create_riemannian_optimizer`) interleaved, "
        f"median of {meta['optim_repeats']} steps after {meta['optim_warmup']} warm-up, synchronized.",
        "",
        "| rank | LoRA params | AdamW ms | AdamW fused ms | ScaledAdamW ms | peft Riemannian ms "
        "| ScaledAdamW / AdamW | ScaledAdamW / AdamW fused | peft / ScaledAdamW |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if note:
        lines += ["", note]
    for o in optim:
        if "error" in o:
            lines.append(f"| {o['rank']} | - | {o['error'].replace('|', '/')} | | | | | | |")
            continue
        lines.append(f"| {o['rank']} | {o['params']:,} | {o['AdamW']:.3f} | {o['AdamW fused']:.3f} "
                     f"| {o['ScaledAdamW']:.3f} | {o['peft Riemannian']:.3f} | {o['ScaledAdamW'] / o['AdamW']:.2f} "
                     f"| {o['ScaledAdamW'] / o['AdamW fused']:.2f} "
                     f"| {o['peft Riemannian'] / o['ScaledAdamW']:.2f} |")
    return "\n".join(lines) + "\n"


def models_meta(specs) -> list[dict]:
    return [{"name": s.name, "params": unet_params(s.unet), "resolution": s.resolution, "latent": s.latent,
             "warmup": s.warmup, "steps": s.steps} for s in specs]


# ---- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs on whatever device there is")
    parser.add_argument("--output", type=Path, help=f"table to write (default, full mode only: {DEFAULT_OUTPUT})")
    parser.add_argument("--compile", action="store_true", help="also time the bare loop with torch.compile(unet)")
    parser.add_argument("--time-budget", type=float, help="seconds after which no new cell starts "
                        "(default 260; 900 with --compile; 240 with --smoke)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        sys.exit("the full benchmark needs a CUDA GPU (it builds the SDXL UNet); use --smoke for tiny configs")
    output = args.output or (None if args.smoke else DEFAULT_OUTPUT)
    budget = args.time_budget or (240.0 if args.smoke else 900.0 if args.compile else 260.0)
    deadline = start + budget
    specs = SMOKE_MODELS if args.smoke else FULL_MODELS
    if device.type == "cpu":  # smoke: a correctness run; one thread is fastest on a shared machine
        torch.set_num_threads(1)
    import diffusers
    import peft

    command = "python benchmarks/gpu.py" + (" --smoke" if args.smoke else "") + (" --compile" if args.compile else "")
    meta = {"mode": "smoke" if args.smoke else "full", "command": command, "device_type": device.type,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "models": models_meta(specs), "optim_warmup": 1 if args.smoke else 5,
            "optim_repeats": 3 if args.smoke else 30, "failures": []}

    optim = []
    for rank in RANKS:
        try:
            optim.append(bench_optimizers(specs[0].unet, rank, meta["optim_warmup"], meta["optim_repeats"], device))
        except Exception as err:  # noqa: BLE001
            optim.append({"rank": rank, "error": f"{type(err).__name__}: {str(err)[:100]}"})
        free_memory(device)
        print(f"optimizer step, rank {rank}: done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = [write_model(tmp / s.name, s, device) for s in specs]
        free_memory(device)
        print(f"model folders written ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        phases = [["bare", "trainer"]] + ([["bare+compile"]] if args.compile else [])
        jobs = []
        for loops in phases:
            for dtype in DTYPES:
                name = f"{dtype} {'/'.join(loops)}"
                jobs.append({"name": name, "device": str(device), "dtype": dtype, "deadline": deadline,
                             "loops": loops, "specs": [asdict(s) for s in specs], "folders": [str(f) for f in folders],
                             "results": str(tmp / f"{len(jobs)}.jsonl"), "log": str(tmp / f"{len(jobs)}.log")})
        # On a GPU one process at a time; a CPU smoke run checks the code path and may share the cores.
        stop_at = deadline + (60 if args.smoke else 240)
        meta["failures"] = run_workers(jobs, stop_at, parallel=device.type == "cpu")
        cells = [json.loads(ln) for job in jobs if Path(job["results"]).exists()
                 for ln in Path(job["results"]).read_text().splitlines()]
        for job in jobs:
            if meta["failures"]:
                print(f"---- {job['name']} log (end) ----\n{Path(job['log']).read_text()[-3000:]}", file=sys.stderr)
    meta["wall_s"] = time.time() - start
    table = render(meta, cells, optim)
    print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table)
        print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
