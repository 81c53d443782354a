"""Step time and state memory of ScaledAdamW against torch AdamW and peft's Riemannian optimizer.

Reproduce:  python benchmarks/optimizer_overhead.py [--ranks 4 16 64] [--repeats 30]

The LoRA factors are those diffusers attaches for DreamBooth (UNet to_q/to_k/to_v/to_out.0,
text encoder q/k/v/out_proj) on the real SD1.5 UNet and CLIP-L text encoder. The models are built
from their published configs on the meta device (same layer shapes, no 3.4 GB of random weights:
only the LoRA factors and their gradients matter for an optimizer step). Every optimizer gets its
own copy of the same factors and random gradients; steps are timed interleaved (A, B, C, A, B, C,
...) and the median is reported. "floor" is the preconditioner's unavoidable arithmetic alone: the
r x r Gram matrices, their Cholesky inverses and the products with the gradients as batched
matmuls on tensors stacked beforehand.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from difflora.optim import ScaledAdamW
from difflora.optim.preconditioner import damped_inverse

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_targets() -> list[tuple[str, int, int]]:
    """``(module name, in_features, out_features)`` of every LoRA target of SD1.5 UNet + CLIP-L."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    out = []
    for prefix, model, targets in (("unet", unet, UNET_TARGETS), ("text_encoder", text, TEXT_TARGETS)):
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(targets):
                out.append((f"{prefix}.{name}", mod.in_features, mod.out_features))
    return out


class FactorHolder(torch.nn.Module):
    """LoRA factors under peft's names (``<module>.lora_A.default.weight``), for peft's factory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            mod = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(t.clone()))


def make_factors(targets, rank: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    values, grads = {}, {}
    for name, fin, fout in targets:
        key = name.replace(".", "_")
        values[f"{key}.lora_A.default.weight"] = torch.randn(rank, fin, generator=g) / fin ** 0.5
        values[f"{key}.lora_B.default.weight"] = torch.randn(fout, rank, generator=g) * 1e-2
    for n, v in values.items():
        grads[n] = torch.randn(v.shape, generator=g) * 1e-3
    return values, grads


def params_with_grads(values, grads):
    out = []
    for n, v in values.items():
        p = torch.nn.Parameter(v.clone())
        p.grad = grads[n].clone()
        out.append((n, p))
    return out


def floor_fn(values, grads, rank):
    """Pre-stacked batched Gram + damped inverse + products: the preconditioner's arithmetic alone."""
    buckets: dict[tuple, list[str]] = {}
    for n in values:
        if ".lora_A." in n:
            nb = n.replace(".lora_A.", ".lora_B.")
            buckets.setdefault((values[n].shape, values[nb].shape), []).append(n)
    stacks = []
    for names in buckets.values():
        nbs = [n.replace(".lora_A.", ".lora_B.") for n in names]
        stacks.append((torch.stack([values[n] for n in names]), torch.stack([values[n] for n in nbs]),
                       torch.stack([grads[n] for n in names]), torch.stack([grads[n] for n in nbs])))

    def run():
        for a, b, ga, gb in stacks:
            k = a.shape[0]
            gram = torch.cat([torch.bmm(b.transpose(1, 2), b), torch.bmm(a, a.transpose(1, 2))])
            inv = damped_inverse(gram, 1e-2)
            torch.bmm(inv[:k], ga)
            torch.bmm(gb, inv[k:])
    return run


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def bench_rank(targets, rank: int, repeats: int) -> dict[str, float]:
    values, grads = make_factors(targets, rank)
    opts = {
        "ScaledAdamW": ScaledAdamW(params_with_grads(values, grads), lr=1e-4, weight_decay=1e-2),
        "AdamW foreach": torch.optim.AdamW([p for _, p in params_with_grads(values, grads)], lr=1e-4, foreach=True),
        "AdamW for-loop": torch.optim.AdamW([p for _, p in params_with_grads(values, grads)], lr=1e-4, foreach=False),
        "AdamW fused": torch.optim.AdamW([p for _, p in params_with_grads(values, grads)], lr=1e-4, fused=True),
    }
    from peft.optimizers import create_riemannian_optimizer

    holder = FactorHolder(values)
    peft_grads = {n: grads[n] for n in values}
    for n, p in holder.named_parameters():
        p.grad = peft_grads[n].clone()
    opts["peft Riemannian"] = create_riemannian_optimizer(holder, torch.optim.AdamW, lr=1e-4, reg=1e-2)
    peft_params = list(holder.named_parameters())
    floor = floor_fn(values, grads, rank)
    times: dict[str, list[float]] = {k: [] for k in [*opts, "floor"]}
    for i in range(repeats + 3):
        for name, opt in opts.items():
            if name == "peft Riemannian":  # peft rewrites .grad in place: restore it outside the timing
                for n, p in peft_params:
                    p.grad.copy_(peft_grads[n])
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= 3:
                times[name].append(dt)
        t0 = time.perf_counter()
        floor()
        if i >= 3:
            times["floor"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med["params"] = sum(v.numel() for v in values.values())
    med["tensors"] = len(values)
    med["state ScaledAdamW"] = state_bytes(opts["ScaledAdamW"])
    med["state AdamW"] = state_bytes(opts["AdamW foreach"])
    return med


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    targets = lora_targets()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {len(targets)} LoRA targets (SD1.5 UNet + CLIP-L)\n")
    # torch's default AdamW on CPU is the for-loop; "best" is the fastest of the three kernels (fused).
    print("| rank | LoRA params | ScaledAdamW ms | AdamW foreach ms | AdamW for-loop ms | AdamW fused ms "
          "| peft Riemannian ms | floor ms | ScaledAdamW / default AdamW | ScaledAdamW / best AdamW "
          "| ScaledAdamW / (best AdamW + floor) | peft / ScaledAdamW | extra state bytes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rank in args.ranks:
        m = bench_rank(targets, rank, args.repeats)
        best = min(m["AdamW foreach"], m["AdamW for-loop"], m["AdamW fused"])
        print(f"| {rank} | {m['params']:,} | {m['ScaledAdamW']:.2f} | {m['AdamW foreach']:.2f} "
              f"| {m['AdamW for-loop']:.2f} | {m['AdamW fused']:.2f} | {m['peft Riemannian']:.2f} | {m['floor']:.2f} "
              f"| {m['ScaledAdamW'] / m['AdamW for-loop']:.2f} "
              f"| {m['ScaledAdamW'] / best:.2f} | {m['ScaledAdamW'] / (best + m['floor']):.2f} "
              f"| {m['peft Riemannian'] / m['ScaledAdamW']:.2f} | {m['state ScaledAdamW'] - m['state AdamW']} |",
              flush=True)


if __name__ == "__main__":
    main()
