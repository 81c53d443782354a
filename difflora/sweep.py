"""Learning-rate sweeps: the paper's robustness claim as a table and a picture.

``difflora sweep --config configs/sweeps/tiny.yaml`` trains one DreamBooth LoRA per
(optimizer, learning rate, seed), samples the concept in new contexts, scores the samples against
the concept's photos (CLIP-I, DINO) and against their prompts (CLIP-T), and writes:

- ``results.csv``: one row per run (rewritten after every run, so it is always current);
- ``plot_<metric>.png`` (at the end): the metric versus the learning rate (log axis), one line per optimizer
  (mean over seeds) with the seeds' min-max band; ``plot_final_loss.png`` likewise;
- ``summary.md``: per optimizer, the best learning rate and the width, in decades, of the
  contiguous band of learning rates around it whose mean score reaches 90% of the best.

A run that finished (its ``sweep_row.json``) is not redone on a rerun, so an interrupted sweep
picks up where it stopped; if only the ``eval`` settings changed, finished runs are re-scored, not
retrained, and a run trained with other ``base`` settings is refused rather than silently reused. A run whose loss becomes NaN/inf is a result ("diverged"), not an error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from difflora.config import check_device, check_image_size, coerce_option, config_to_dict, parse_config
from difflora.errors import UserError
from difflora.output_dir import (
    Outputs,
    atomic_save_image,
    atomic_write,
    atomic_write_text,
    output_job,
    prepare_output_dir,
)

ROW_FILE = "sweep_row.json"
GRID_KEYS = ("optimizer", "learning_rate", "seed", "output_dir")
SCORES = ("clip_i", "clip_t", "dino")
COLUMNS = ("optimizer", "learning_rate", "seed", "status", "final_loss", "steps", "seconds", *SCORES, "run_dir")


@dataclass
class SweepEval:
    """How every run is sampled and scored (the ``eval:`` section of a sweep file)."""

    prompts: list[str] | None = field(default=None, metadata={"help": "prompt templates with {} for the concept"})
    prompts_file: str | None = field(default=None, metadata={"help": "file of templates, one per line"})
    num_prompts: int | None = field(default=None, metadata={"help": "use only the first N templates"})
    concept: str = field(default="sks", metadata={"help": "what {} becomes in the sampled prompts, e.g. 'sks dog'"})
    clip_concept: str | None = field(default=None, metadata={
        "help": "what {} becomes in the CLIP-T text, e.g. 'dog' (the trigger word means nothing to CLIP); "
                "default: concept"})
    clip_model: str = field(default="", metadata={"help": "CLIP folder or hub id"})
    dino_model: str | None = field(default=None, metadata={"help": "DINO ViT folder or hub id (optional)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "sampling seeds per prompt"})
    steps: int = field(default=25, metadata={"help": "sampler steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance"})
    resolution: int | None = field(default=None, metadata={"help": "sample size; default: the training resolution"})
    batch_size: int = field(default=8, metadata={"help": "images per pipeline call"})
    device: str = field(default="cpu", metadata={"help": "device for sampling and scoring"})


@dataclass
class SweepConfig:
    """Train DreamBooth LoRAs over optimizers x learning rates x seeds; sample, score and plot them."""

    optimizers: list[str] = field(default_factory=list, metadata={"help": "optimizer names (build_optimizer)"})
    learning_rates: list[float] = field(default_factory=list, metadata={"help": "UNet LoRA learning rates"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "training seeds"})
    base: dict = field(default_factory=dict, metadata={"help": "DreamBooth options fixed for every run"})
    eval: dict = field(default_factory=dict, metadata={"help": "sampling and scoring (see SweepEval)"})
    output_dir: str = field(default="outputs/sweep", metadata={"help": "one folder per run, CSV, plots"})
    text_encoder_lr_ratio: float | None = field(default=None, metadata={
        "help": "if set, text_encoder_lr = ratio x learning_rate in every run (needs train_text_encoder)"})

    def validate(self) -> None:
        if not self.optimizers:
            raise UserError("optimizers is empty; list at least one, e.g. optimizers: [adamw, scaled_adamw]")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise UserError("learning_rates must list positive numbers, e.g. learning_rates: [1e-4, 1e-3]")
        if not self.seeds:
            raise UserError("seeds is empty; give at least one, e.g. seeds: [0]")
        if not isinstance(self.base, dict) or not isinstance(self.eval, dict):
            raise UserError("base and eval must be mappings of option: value in the sweep YAML")
        taken = sorted(set(self.base) & set(GRID_KEYS))
        if taken:
            raise UserError(f"base sets {', '.join(taken)}, which the sweep sets per run; remove it from base")


def eval_settings(cfg: SweepConfig) -> SweepEval:
    """The ``eval:`` mapping as a checked :class:`SweepEval` (unknown keys are refused)."""
    known = {f.name: f for f in fields(SweepEval)}
    hints = typing.get_type_hints(SweepEval)
    kwargs = {}
    for key, value in cfg.eval.items():
        key = str(key).replace("-", "_")
        if key not in known:
            raise UserError(f"unknown eval option '{key}'; valid: {', '.join(sorted(known))}")
        kwargs[key] = coerce_option(f"eval.{key}", value, hints[key])
    ev = SweepEval(**kwargs)
    if not ev.clip_model:
        raise UserError("eval.clip_model is missing; give a CLIP folder or hub id")
    if not ev.prompts and not ev.prompts_file:
        raise UserError("eval needs prompts (a list of templates with {}) or prompts_file")
    if not ev.seeds or ev.steps <= 0:
        raise UserError("eval.seeds must not be empty and eval.steps must be positive")
    if ev.batch_size <= 0:
        raise UserError(f"eval.batch_size must be positive, got {ev.batch_size}")
    check_image_size(ev.resolution, ev.resolution, ("eval.resolution", "eval.resolution"))
    return ev


def prompt_templates(ev: SweepEval) -> list[str]:
    """Templates from the list and/or file; each must contain one ``{}``."""
    templates = list(ev.prompts or [])
    if ev.prompts_file:
        from difflora.sampling import read_prompts

        templates += read_prompts(ev.prompts_file)
    if ev.num_prompts is not None:
        templates = templates[: ev.num_prompts]
    if not templates:
        raise UserError("eval has no prompt templates left; check eval.prompts, prompts_file and num_prompts")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise UserError(f"prompt template '{bad[0]}' must contain exactly one {{}} for the concept")
    return templates


def run_name(optimizer: str, lr: float, seed: int) -> str:
    return f"{optimizer}-lr{lr:g}-s{seed}"


def dreambooth_argv(base: dict[str, Any], **per_run: Any) -> list[str]:
    """``key=value`` / ``--key v1 v2`` tokens that ``parse_config(DreamBoothConfig, ...)`` reads."""
    argv: list[str] = []
    for key, value in {**base, **per_run}.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv.append(f"{key}={value}")
    return argv


def _hash(settings: dict) -> str:
    """A short fingerprint of settings, to notice a sweep file edited between reruns."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _train(cfg):
    """Indirection so tests can count trainings."""
    from difflora.train.dreambooth import train

    return train(cfg)


def _score_run(run_dir: Path, db_cfg, ev: SweepEval, templates: list[str], pipes: dict) -> dict[str, float]:
    """Sample the run's LoRA on its base model and score the samples.

    The base pipeline is loaded once per sweep (``pipes``) and each run's LoRA is loaded as an
    adapter and deleted afterwards, so the next run samples the untouched base plus its own LoRA.
    """
    from difflora.evaluation import load_images, score_images
    from difflora.lora_io import LORA_WEIGHT_NAME, apply_loras
    from difflora.sampling import generate, load_pipeline, make_grid

    key = (db_cfg.pretrained_model_name_or_path, ev.device)
    if key not in pipes:
        pipes[key] = load_pipeline(db_cfg.pretrained_model_name_or_path, device=ev.device)
    pipe = pipes[key]
    adapters = apply_loras(pipe, [(str(run_dir / LORA_WEIGHT_NAME), 1.0)])
    try:
        size = ev.resolution or db_cfg.resolution
        prompts = [t.format(ev.concept) for t in templates]
        rows = generate(pipe, prompts, ev.seeds, steps=ev.steps, guidance=ev.guidance, height=size, width=size,
                        batch_size=ev.batch_size, progress=False)
    finally:
        pipe.delete_adapters(adapters)
    grid = make_grid(rows, prompts, [f"seed {s}" for s in ev.seeds])
    atomic_save_image(grid, run_dir / "sweep_samples.png")
    clip_texts = [t.format(ev.clip_concept or ev.concept) for t in templates for _ in ev.seeds]
    reference = load_images(db_cfg.instance_data_dir, "instance", "base.instance_data_dir")
    images = [im for row in rows for im in row]
    return score_images(images, clip_texts, reference, ev.clip_model, ev.dino_model, ev.device)


def band_width_decades(lrs: list[float], scores: list[float], fraction: float = 0.9) -> float | None:
    """Width in decades of the contiguous band of learning rates around the best score that reach
    ``fraction`` of it (0 when only the best one does; None when no score is positive)."""
    pairs = sorted((lr, s) for lr, s in zip(lrs, scores) if s is not None and math.isfinite(s))
    if not pairs:
        return None
    best_i = max(range(len(pairs)), key=lambda i: pairs[i][1])
    best = pairs[best_i][1]
    if best <= 0:
        return None
    lo = hi = best_i
    while lo > 0 and pairs[lo - 1][1] >= fraction * best:
        lo -= 1
    while hi < len(pairs) - 1 and pairs[hi + 1][1] >= fraction * best:
        hi += 1
    return math.log10(pairs[hi][0] / pairs[lo][0])


def _by_lr(rows: list[dict], optimizer: str, key: str) -> dict[float, list[float]]:
    """{lr: finite values of ``key`` over seeds} for one optimizer."""
    out: dict[float, list[float]] = {}
    for r in rows:
        v = r.get(key)
        if r["optimizer"] == optimizer and v is not None and math.isfinite(v):
            out.setdefault(r["learning_rate"], []).append(v)
    return dict(sorted(out.items()))


def plot_metric(rows: list[dict], key: str, path: Path, ylabel: str, log_y: bool = False) -> None:
    """``key`` vs learning rate (log x), one line per optimizer (seed mean) with the min-max band."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch in the caller's process

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        series = _by_lr(rows, opt, key)
        if not series:
            continue
        lrs = list(series)
        mean = [sum(v) / len(v) for v in series.values()]
        line, = ax.plot(lrs, mean, marker="o", label=opt)
        ax.fill_between(lrs, [min(v) for v in series.values()], [max(v) for v in series.values()],
                        color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, fig.savefig)


def summarise(rows: list[dict], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """Per optimizer and metric: best seed-mean score, its learning rate, and the 90% band width."""
    out: dict[str, dict[str, Any]] = {}
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        entry: dict[str, Any] = {"runs": sum(r["optimizer"] == opt for r in rows),
                                 "diverged": sum(r["optimizer"] == opt and r["status"] != "ok" for r in rows)}
        for key in metrics:
            series = _by_lr(rows, opt, key)
            if not series:
                continue
            means = {lr: sum(v) / len(v) for lr, v in series.items()}
            best_lr = max(means, key=means.get)
            entry[key] = {"best": means[best_lr], "best_lr": best_lr,
                          "band_decades": band_width_decades(list(means), list(means.values()))}
        out[opt] = entry
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def summary_markdown(rows: list[dict], summary: dict[str, dict[str, Any]], metrics: list[str]) -> str:
    lrs = sorted({r["learning_rate"] for r in rows})
    span = math.log10(lrs[-1] / lrs[0]) if len(lrs) > 1 else 0.0
    lines = ["# Learning-rate sweep", "",
             f"{len(rows)} runs; learning rates {lrs[0]:g} to {lrs[-1]:g} ({span:.1f} decades). "
             "Scores are cosines in [0, 1] (higher is better), seed means. Band = width in decades of the "
             "contiguous range of learning rates around the best one whose score reaches 90% of the best.", "",
             "| optimizer | runs | diverged | " + " | ".join(f"best {m} (lr) | {m} 90% band (decades)" for m in metrics) + " |",
             "|---|---|---|" + "---|---|" * len(metrics)]
    for opt, e in summary.items():
        cells = []
        for m in metrics:
            s = e.get(m)
            cells += ["-", "-"] if s is None else [f"{_fmt(s['best'])} ({s['best_lr']:g})",
                                                   _fmt(s["band_decades"], ".2f")]
        lines.append(f"| {opt} | {e['runs']} | {e['diverged']} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), ".4g" if c == "final_loss" else ".3f")
                                       if c not in ("learning_rate",) else f"{r[c]:g}" for c in COLUMNS[:-1]) + " |")
    return "\n".join(lines) + "\n"


def _write_results(out: Path, rows: list[dict], metrics: list[str], plots: bool = True) -> None:
    """results.csv and summary.md (after every run, so they are always current); plots at the end."""
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})

    atomic_write(out / "results.csv", write_csv)
    atomic_write_text(out / "summary.md", summary_markdown(rows, summarise(rows, metrics), metrics))
    if plots:
        for key in metrics:
            plot_metric(rows, key, out / f"plot_{key}.png", f"{key.replace('_', '-').upper()} (cosine)")
        plot_metric(rows, "final_loss", out / "plot_final_loss.png", "final training loss")


# What a sweep writes at the top of output_dir besides one folder per run (named by run_name).
OUTPUTS = Outputs("sweep", ("results.csv", "summary.md"), patterns=(r"plot_\w+\.png",),
                  recognise=lambda out: (out / "results.csv").is_file())


@output_job
def sweep(cfg: SweepConfig) -> list[dict]:
    """Run (or finish) the sweep; return one row per run in grid order."""
    from difflora.data import find_images
    from difflora.lora_io import LORA_WEIGHT_NAME
    from difflora.train.dreambooth import DreamBoothConfig

    ev = eval_settings(cfg)
    check_device(ev.device, "eval.device")
    templates = prompt_templates(ev)
    grid = [(o, lr, s) for o in cfg.optimizers for lr in cfg.learning_rates for s in cfg.seeds]
    out = Path(cfg.output_dir)
    # Check every run's options before the first one trains, so a typo fails in seconds, not hours.
    configs = {}
    for opt, lr, seed in grid:
        extra = {}
        if cfg.text_encoder_lr_ratio is not None:
            extra["text_encoder_lr"] = cfg.text_encoder_lr_ratio * lr
        argv = dreambooth_argv(cfg.base, optimizer=opt, learning_rate=lr, seed=seed,
                               output_dir=str(out / run_name(opt, lr, seed)), **extra)
        configs[(opt, lr, seed)] = parse_config(DreamBoothConfig, argv, prog="difflora sweep (base)")
    find_images(next(iter(configs.values())).instance_data_dir, "instance")
    # Locked: two sweeps finishing the same runs would each train them and mix their rows.
    prepare_output_dir(out, OUTPUTS.with_names(*(run_name(*k) for k in grid)), overwrite=False, clear=False,
                       lock=True)
    metrics = ["clip_i", "clip_t"] + (["dino"] if ev.dino_model else [])

    rows: list[dict] = []
    pipes: dict = {}
    eval_hash = _hash({**asdict(ev), "templates": templates})
    for opt, lr, seed in tqdm(grid, desc="sweep", unit="run"):
        run_dir = out / run_name(opt, lr, seed)
        db_cfg = configs[(opt, lr, seed)]
        train_hash = _hash({k: v for k, v in config_to_dict(db_cfg).items() if k not in ("overwrite", "output_dir")})
        done = run_dir / ROW_FILE
        if done.is_file():
            row = json.loads(done.read_text(encoding="utf-8"))
            if row.get("train_hash", train_hash) != train_hash:
                raise UserError(f"run '{run_dir}' was trained with other base settings; delete that folder to "
                                "retrain it, or choose another output_dir")
            if row.get("eval_hash", eval_hash) == eval_hash or row["status"] != "ok":
                rows.append(row)
                continue
        row = {"optimizer": opt, "learning_rate": lr, "seed": seed, "run_dir": run_dir.name,
               "train_hash": train_hash, "eval_hash": eval_hash}
        trained = run_dir / "metrics.json"
        try:
            if (run_dir / LORA_WEIGHT_NAME).is_file() and trained.is_file():
                # trained already (stopped before scoring, or the eval settings changed): score only
                summary = json.loads(trained.read_text(encoding="utf-8"))
            else:
                if run_dir.exists():  # an interrupted run: its latest checkpoint (if any) is picked up
                    db_cfg.resume_from_checkpoint = "latest"
                summary = _train(db_cfg)
        except UserError as err:
            if "the loss became" not in str(err):
                raise
            row.update(status="diverged", final_loss=float("nan"))
        else:
            row.update(status="ok", final_loss=summary["final_loss"], steps=summary["steps"],
                       seconds=round(summary.get("seconds") or 0.0, 2))
            row.update(_score_run(run_dir, db_cfg, ev, templates, pipes))
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(done, json.dumps(row, indent=2) + "\n")
        rows.append(row)
        _write_results(out, rows, metrics, plots=False)
    _write_results(out, rows, metrics)
    return rows


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SweepConfig, argv, prog="difflora sweep")
    rows = sweep(cfg)
    out = Path(cfg.output_dir)
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"wrote {len(rows)} runs to {out / 'results.csv'} and plots beside it")
