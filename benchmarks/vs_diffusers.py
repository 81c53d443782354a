"""Whole-process wall time: difflora's DreamBooth trainer vs diffusers' own example script.

Both scripts get the same command line (the peer's flag names; difflora accepts them): a tiny
model folder built offline, the shipped checkered-star images, ``--max_train_steps 120``, batch 2,
the same resolution and seed, no validation grids, checkpointing off (its interval is past the
last step) and TensorBoard logging (the peer cannot run without a tracker). Each mode runs with
the text encoder frozen and trained, and, frozen, with ``--pre_compute_text_embeddings`` passed to
both. Runs alternate ours, peer, ours, peer, ...; each is a fresh process with a fresh output
folder, timed from start to exit (imports, model loading, training, saving), after one untimed
warm-up of each (file cache). The table reports median and min seconds, their ratio ours / peer
(target <= 0.8) and the final loss each printed, so both demonstrably trained.

The peer is diffusers' ``examples/dreambooth/train_dreambooth_lora.py``; the reader supplies it,
it is not part of this repository. Its tip of history at the time of writing calls
``check_min_version("0.40.0.dev0")`` and runs unchanged with the installed diffusers 0.42.1, so
no older revision is needed; the results note records the file's sha256 and its version line. It
needs ``torchvision`` (transforms only). A torchvision wheel built for another torch variant (CUDA
wheel, CPU torch) fails at import on its missing ``torchvision::nms`` operators; ``--peer-shim
auto`` then declares those two operator schemas before running the script (the transforms it
uses never call them) and the note says so. The peer reads every file of
``--instance_data_dir`` as an image, so the images are copied without their captions.

Engine changes made for this comparison (each one to be measured here later, against the
unchanged engine run with ``--ours /path/to/old/train_dreambooth.py``):

- the loss and gradient-norm finiteness checks read one fused ``[loss, grad_norm]`` tensor (one
  host synchronisation per optimizer step instead of one per micro-batch plus one per check);
- the weight finiteness check sums each tensor and reads one flag (one kernel per tensor instead of
  about five); only a non-finite flag runs the exact per-tensor check that names the weight;
- the progress bar's postfix no longer forces a redraw every step (tqdm's own rate limit decides);
- with the text encoders frozen, prompts were already encoded once and reused;
- an image whose pixels never change between draws (no flips, a crop with no freedom: the case
  here) keeps its VAE posterior and only the sample is drawn per example, with the generator it
  had before, so the draws are unchanged; the peer encodes every image every step (it has no
  ``--cache_latents``, and that flag, which changes the draws, is not passed to ours either).

Where the rest of the time goes (``python -X importtime`` and cProfile of a 40-step run): both
processes spend most of a tiny run importing torch, diffusers (which imports torch._dynamo and
peft) and transformers; the peer also imports torchvision, builds a DataLoader, encodes the prompt
every step without ``--pre_compute_text_embeddings`` and reloads the whole pipeline at the end to
load its LoRA back. Found and not changed here (not engine code): ``loss.png`` costs a matplotlib
(pyplot) import at the end of every run, a few tenths of a second the peer does not spend; with a
tracker on (this comparison needs one) ours also computes the preconditioner's condition numbers
every step for the log.

Known limit: the peer's ``--train_text_encoder`` goes through transformers' ``add_adapter``, which
with transformers 5.x asks for peft >= 0.22; with an older peft that row reports the peer's error.

    python benchmarks/vs_diffusers.py --peer /path/to/train_dreambooth_lora.py           # 5 repeats
    python benchmarks/vs_diffusers.py --peer PEER --repeats 1 --steps 4 --out /tmp/x.md  # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "assets" / "concepts" / "checkered_star"
OURS = ROOT / "train_dreambooth.py"
RESULT = ROOT / "benchmarks" / "results" / "vs_diffusers.md"
LORA_FILE = "pytorch_lora_weights.safetensors"

# Extra flags of each mode, given to both scripts.
MODES: dict[str, list[str]] = {
    "te-off": [],
    "te-on": ["--train_text_encoder"],
    "te-off-precompute": ["--pre_compute_text_embeddings"],
}

# Runs the peer after declaring the two operator schemas a mismatched torchvision wheel lacks.
SHIM = (
    "import runpy, sys, torch\n"
    "for op in ('nms', 'qnms'):\n"
    "    torch.library.define(f'torchvision::{op}', '(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@dataclass
class Run:
    """One timed process: wall seconds, its final loss (None when not found) and the error if it failed."""

    seconds: float
    loss: float | None
    last_line: str
    error: str | None = None


@dataclass
class ModeResult:
    mode: str
    ours: list[Run] = field(default_factory=list)
    peer: list[Run] = field(default_factory=list)


def common_args(model: Path, data: Path, steps: int, batch: int, resolution: int, seed: int) -> list[str]:
    """The flags both scripts get (diffusers' names and defaults made explicit where they differ)."""
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a sks star", "--resolution", str(resolution), "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--seed", str(seed), "--checkpointing_steps", str(100 * steps + 1000),
            "--num_validation_images", "0", "--report_to", "tensorboard"]


def final_loss(text: str) -> tuple[float | None, str]:
    """The last loss a run printed: ours' ``done: ... final loss X`` line, else the last tqdm ``loss=X``."""
    done = re.findall(r"final loss ([-+0-9.eEnaif]+)", text)
    bar = re.findall(r"loss=([-+0-9.eEnaif]+)", text)
    found = done or bar
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    last = next((ln for ln in reversed(lines) if "loss" in ln), lines[-1] if lines else "")
    try:
        return (float(found[-1]) if found else None), last[-160:]
    except ValueError:
        return None, last[-160:]


def run_once(cmd: list[str], env: dict[str, str], out_dir: Path, log: Path) -> Run:
    """Run ``cmd`` to completion in a fresh output folder; wall time from start to exit."""
    shutil.rmtree(out_dir, ignore_errors=True)
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--output_dir", str(out_dir)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                              cwd=out_dir.parent)
        seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    loss, last = final_loss(text)
    error = None
    if proc.returncode != 0:
        error = f"exit {proc.returncode}: {last}"
    elif not (out_dir / LORA_FILE).is_file():
        error = f"no {LORA_FILE} written"
    return Run(seconds, loss, last, error)


def needs_shim(python: str, env: dict[str, str]) -> bool:
    """Whether torchvision fails at import on its missing compiled operators (a mismatched wheel)."""
    probe = subprocess.run([python, "-c", "import torchvision.transforms"], env=env, capture_output=True, text=True)
    return probe.returncode != 0 and "torchvision::" in probe.stderr


def loadavg() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.is_file() else "n/a"


def environment(threads: str) -> list[str]:
    """Versions and machine facts for the results note."""
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}",
            f"CPU: {cpu}, {os.cpu_count()} cores; threads: {threads}; GPU: {gpu}"]


def peer_identity(peer: Path) -> str:
    text = peer.read_text(errors="replace")
    version = re.search(r"check_min_version\([^)]*\)", text)
    digest = hashlib.sha256(peer.read_bytes()).hexdigest()[:16]
    return f"`{peer.name}` sha256 {digest}…, {version.group(0) if version else 'no check_min_version line'}"


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def render(results: list[ModeResult], meta: dict[str, str]) -> str:
    """The markdown results page: settings, environment, load, one row per mode, notes."""
    lines = ["# Whole-process time: difflora vs diffusers' train_dreambooth_lora.py", "",
             f"`{meta['command']}`", "", *[f"- {x}" for x in meta["facts"].splitlines()], "",
             "| mode | runs | ours median s | ours min s | peer median s | peer min s | ratio (median) | "
             "ratio (min) | ours final loss | peer final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok_o = [x for x in r.ours if x.error is None]
        ok_p = [x for x in r.peer if x.error is None]
        if not ok_o or not ok_p:
            why = (r.ours[0].error if not ok_o and r.ours else None) or (r.peer[0].error if r.peer else "no run")
            who = "ours" if not ok_o else "peer"
            lines.append(f"| {r.mode} | {len(r.ours)} | failed ({who}): {why.replace('|', '/')} "
                         "| | | | | | | |")
            continue
        om, pm = statistics.median(x.seconds for x in ok_o), statistics.median(x.seconds for x in ok_p)
        omin, pmin = min(x.seconds for x in ok_o), min(x.seconds for x in ok_p)
        lines.append(f"| {r.mode} | {len(ok_o)} | {om:.2f} | {omin:.2f} | {pm:.2f} | {pmin:.2f} | {om / pm:.3f} | "
                     f"{omin / pmin:.3f} | {fmt(ok_o[-1].loss, '.4f')} | {fmt(ok_p[-1].loss, '.4f')} |")
    lines += ["", "Last log lines (both trained):", ""]
    for r in results:
        for who, runs in (("ours", r.ours), ("peer", r.peer)):
            if runs:
                lines.append(f"- {r.mode}, {who}: `{runs[-1].last_line.replace('`', '')}`")
    lines += ["", meta["notes"], ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", type=Path, required=True, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    ap.add_argument("--ours", type=Path, default=OURS, help="our script (another checkout's, to compare engines)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each script per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each script first (file cache)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    ap.add_argument("--model", type=Path, help="a model folder; default: a tiny one built offline")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads of both processes; default: unset")
    ap.add_argument("--peer-pythonpath", help="prepended to PYTHONPATH for the peer only (e.g. its torchvision)")
    ap.add_argument("--peer-shim", choices=["auto", "on", "off"], default="auto",
                    help="declare torchvision's two missing operators when its wheel does not match torch")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    if not args.peer.is_file():
        ap.error(f"--peer {args.peer}: no such file; fetch diffusers' examples/dreambooth/train_dreambooth_lora.py")
    if not args.ours.is_file():
        ap.error(f"--ours {args.ours}: no such file")
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1 or args.batch < 1:
        ap.error("--repeats, --steps and --batch must be >= 1 and --warmup >= 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        ap.error(f"--modes: unknown {unknown}; valid: {', '.join(MODES)}")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    peer_env = dict(env)
    if args.peer_pythonpath:
        peer_env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_pythonpath, env.get("PYTHONPATH")) if p)
    shim = args.peer_shim == "on" or (args.peer_shim == "auto" and needs_shim(sys.executable, peer_env))
    peer_cmd = [sys.executable, "-c", SHIM, str(args.peer)] if shim else [sys.executable, str(args.peer)]
    ours_cmd = [sys.executable, str(args.ours)]

    load_before = loadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="vs-diffusers-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model
        if model is None:
            from difflora.tiny_models import make_tiny_model

            model = make_tiny_model(tmp / "model", with_eval_models=False, resolution=args.resolution)
        data = tmp / "images"
        data.mkdir()
        for image in sorted(CONCEPT.glob("*.png")):
            shutil.copy(image, data / image.name)
        base = common_args(model, data, args.steps, args.batch, args.resolution, args.seed)
        for mode in args.modes:
            res = ModeResult(mode)
            flags = base + MODES[mode]
            jobs = [("ours", ours_cmd + flags, env, res.ours), ("peer", peer_cmd + flags, peer_env, res.peer)]
            for i in range(args.warmup + args.repeats):
                for who, cmd, run_env, sink in jobs:  # A B A B ...
                    run = run_once(cmd, run_env, tmp / f"out-{who}", tmp / f"{who}-{mode}-{i}.log")
                    print(f"{mode} {who} #{i}{' (warm-up)' if i < args.warmup else ''}: {run.seconds:.2f} s, "
                          f"loss {fmt(run.loss, '.4f')}{'' if run.error is None else ', ' + run.error}", flush=True)
                    if i >= args.warmup:
                        sink.append(run)
                    if run.error is not None:
                        break
                if any(r.error for r in res.ours + res.peer):
                    break
            results.append(res)
    load_after = loadavg()

    threads = str(args.threads) if args.threads else f"unset (torch default {_torch_threads()})"
    command = "python benchmarks/vs_diffusers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    facts = "\n".join([
        *environment(threads),
        f"peer: {peer_identity(args.peer)}" + (" (run with the torchvision operator shim)" if shim else ""),
        f"model: {'tiny SD built offline' if args.model is None else args.model}; {args.resolution} px, "
        f"batch {args.batch}, {args.steps} steps, seed {args.seed}, {args.warmup} warm-up + {args.repeats} "
        "timed runs per script, alternating",
        f"load average (1, 5, 15 min): before {load_before}, after {load_after}",
    ])
    notes = ("Ratio = ours / peer whole-process wall time (target <= 0.8). A load average near or above the "
             "core count means the machine was busy and the times are not to be trusted; rerun on a quiet one.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, {"command": command, "facts": facts, "notes": notes}))
    print(f"wrote {args.out}")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
