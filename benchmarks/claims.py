"""The paper's first experiments, judged by held-out loss: convergence and robustness to lr and batch size.

Reproduce:

    python benchmarks/claims.py                 # the full grid, in resumable stages (hours on 2 cores)
    python benchmarks/claims.py --quick         # a small grid of every setting (<= 5 minutes), to --out
    python benchmarks/claims.py --report        # rebuild summary, tables and plots from the JSON only
    python benchmarks/claims.py --stages clip_pattern:core --max-minutes 60

Settings (one model each; details in the helper modules):

* ``clip_pattern`` (``claims_clip.py``): LoRA on the toy CLIP's vision transformer, adapted to a
  task it never saw (the surface pattern of a shape); judge: held-out cross-entropy / accuracy.
* ``dreambooth_toy_sd`` and ``edlora_toy_sd`` (``claims_diffusion.py``): DreamBooth and ED-LoRA of
  the checkered star on the toy Stable Diffusion through difflora's trainers; judge: concept fit
  (held-out denoising loss of the concept's images under unseen crops, flips and captions) and
  prior drift (how far predictions on prompts without the concept move from the base model's).

Every run is evaluated every ``eval_every`` steps (11 points including step 0) on a fixed set (fixed
examples, noise and timesteps), so a run's curve is a function of the run alone; runs with the same
seed share data order, noise and LoRA initialisation across optimizers (paired). Each finished run
is appended to the JSON at once; a rerun skips finished runs (keyed by optimizer, lr, seed, batch
size) and refuses a file whose fixed settings (steps, eval_every, ...) differ. Stages run in order
(``STAGES``): the cheap non-diffusion setting first, then the diffusion settings, then the extra
peers; each prints its wall time, which is also stored in the JSON. Statistics are defined in
``claims_report.py``. No option here is tuned per optimizer: every optimizer gets the same grid
and torch's defaults (weight decay 0, SGD without momentum, constant lr, no gradient clipping).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import claims_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CORE = ["adamw", "scaled_adamw", "sgd", "scaled_sgd"]


def _lrs(lo_exp: float, hi_exp: float, per_decade: int) -> list[float]:
    n = round((hi_exp - lo_exp) * per_decade)
    return [float(f"{10 ** (lo_exp + k / per_decade):.4g}") for k in range(n + 1)]


SETTINGS: dict[str, dict[str, Any]] = {
    "clip_pattern": dict(
        kind="clip",
        description="LoRA (rank 4, q/k/v/out of the 4 vision layers) on the toy CLIP's vision transformer, "
                    "classifying the surface pattern of a shape (plain / striped / dotted / checkered) through "
                    "a frozen linear probe; eval loss = cross-entropy on 256 held-out scenes; prior drift = mean "
                    "squared change of the normalised image embeddings of 128 plain toy-world scenes.",
        optimizers=CORE + ["loraplus", "peft_riemannian"], extra=["loraplus", "peft_riemannian"],
        learning_rates=_lrs(-4, 1, 2), batch_sizes=[8, 32], seeds=[0, 1, 2, 3, 4],
        config=dict(steps=150, eval_every=15, sizes=[2048, 256, 128])),
    "dreambooth_toy_sd": dict(
        kind="dreambooth",
        description="DreamBooth of the checkered star (5 images) on the toy Stable Diffusion (assets/toy-sd), "
                    "UNet attention LoRA rank 4, 32 px, cached latents, through difflora.train.dreambooth; eval "
                    "loss = concept fit (120 fixed held-out denoising problems); prior drift = mean squared "
                    "difference from the base model's predictions on 16 toy-world prompts x 2 timesteps.",
        optimizers=CORE + ["loraplus", "peft_riemannian"], extra=["loraplus", "peft_riemannian"],
        learning_rates=_lrs(-5, 1, 1), batch_sizes=[1, 4], seeds=[0, 1, 2, 3, 4],
        config=dict(steps=120, eval_every=12, clip_scores=True)),
    "edlora_toy_sd": dict(
        kind="edlora",
        description="ED-LoRA (Mix-of-Show) of the checkered star on the toy Stable Diffusion: layer-wise "
                    "embeddings of two words plus rank-4 LoRA on text-encoder and UNet attention, through "
                    "difflora.mix_of_show.edlora; lr = UNet LoRA lr, text-encoder LoRA lr/10, embeddings 10 lr "
                    "(Mix-of-Show's ratios); scaled_adamw_official = ScaledAdamW(variant='official'), the "
                    "update of the paper's released Mix-of-Show AdamWr. Same judge as dreambooth_toy_sd.",
        optimizers=CORE + ["scaled_adamw_official"], extra=[],
        learning_rates=_lrs(-5, 1, 1), batch_sizes=[1, 4], seeds=[0, 1, 2, 3, 4],
        config=dict(steps=120, eval_every=12, clip_scores=True)),
}
QUICK: dict[str, dict[str, Any]] = {
    "clip_pattern": dict(optimizers=["adamw", "scaled_adamw"], extra=[], learning_rates=[1e-3, 1e-2],
                         batch_sizes=[8], seeds=[0, 1], config=dict(steps=20, eval_every=2, sizes=[256, 64, 32])),
    "dreambooth_toy_sd": dict(optimizers=["adamw", "scaled_adamw"], extra=[], learning_rates=[1e-3, 1e-2],
                              batch_sizes=[2], seeds=[0],
                              config=dict(steps=10, eval_every=1, judge=dict(per_item=1, n_prior=8, prior_per_item=1))),
    "edlora_toy_sd": dict(optimizers=["scaled_adamw", "scaled_adamw_official"], extra=[],
                          learning_rates=[1e-3, 1e-2], batch_sizes=[1], seeds=[0],
                          config=dict(steps=10, eval_every=1, judge=dict(per_item=1, n_prior=8, prior_per_item=1))),
}
# Stage "NAME:core" runs the setting's optimizers other than its extras, "NAME:extra" the extras.
STAGES = ("clip_pattern:core", "dreambooth_toy_sd:core", "edlora_toy_sd:core", "clip_pattern:extra",
          "dreambooth_toy_sd:extra")


def settings(quick: bool) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in SETTINGS.items():
        out[name] = {**spec, **(QUICK[name] if quick else {})}
    return out


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------

def run_one(spec: dict[str, Any], optimizer: str, lr: float, seed: int, batch_size: int) -> dict[str, Any]:
    """Train and judge one run of a setting; returns its record (JSON-ready)."""
    cfg = spec["config"]
    cpu0 = time.process_time()
    if spec["kind"] == "clip":
        from benchmarks.claims_clip import run

        record = run(optimizer, lr, seed, batch_size, cfg["steps"], cfg["eval_every"], tuple(cfg["sizes"]))
        losses = record.pop("train_loss")
        record["final_train_loss"] = sum(losses[-10:]) / len(losses[-10:]) if losses else None
    else:
        from benchmarks.claims_diffusion import run

        record = run(spec["kind"], optimizer, lr, seed, batch_size, cfg["steps"], cfg["eval_every"],
                     cfg.get("clip_scores", False), cfg.get("judge"))
    # CPU time of this process: unlike wall time it does not count waiting for the shared cores
    record["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    return _clean({"optimizer": optimizer, "lr": lr, "seed": seed, "batch_size": batch_size, **record})


def _clean(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN / inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------
# The results file
# ------------------------------------------------------------------------------------------------

def _key(optimizer: str, lr: float, seed: int, batch_size: int) -> tuple:
    return optimizer, float(f"{lr:.6g}"), int(seed), int(batch_size)


def load(path: Path, specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results so far (or an empty skeleton); refuses runs made with other fixed settings."""
    results = json.loads(path.read_text()) if path.is_file() else {"settings": {}}
    for name, spec in specs.items():
        entry = results["settings"].get(name)
        if entry is None:
            entry = results["settings"][name] = {"description": spec["description"], "kind": spec["kind"],
                                                 "config": spec["config"], "optimizers": [], "learning_rates": [],
                                                 "seeds": [], "batch_sizes": [], "runs": [], "summary": {},
                                                 "timing": {}}
        if entry["config"] != spec["config"] and entry["runs"]:
            raise SystemExit(f"{path}: setting {name} was run with {entry['config']}, not {spec['config']}; "
                             "use another --out or delete that setting's entry")
        entry["config"], entry["description"] = spec["config"], spec["description"]
        for field in ("optimizers", "learning_rates", "seeds", "batch_sizes"):
            entry[field] = list(dict.fromkeys([*entry[field], *spec[field]]))
        entry["learning_rates"] = sorted(entry["learning_rates"])
    return results


_OWN_STAGES: set[str] = set()  # stages this process has run: their timing is ours, the rest is the file's


def save(path: Path, results: dict[str, Any]) -> None:
    """Write the results, merged with the file as it is now (another process may run other stages).

    Under an exclusive lock: runs are united by key (ours win), and the timing of stages this
    process did not run is taken from the file. ``results`` is updated to the merged content.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            disk = json.loads(path.read_text())
            for name, theirs in disk.get("settings", {}).items():
                ours = results["settings"].setdefault(name, theirs)
                if ours is theirs:
                    continue
                have = {_key(r["optimizer"], r["lr"], r["seed"], r["batch_size"]) for r in ours["runs"]}
                ours["runs"] += [r for r in theirs["runs"]
                                 if _key(r["optimizer"], r["lr"], r["seed"], r["batch_size"]) not in have]
                for stage, t in theirs.get("timing", {}).items():
                    if stage not in _OWN_STAGES:
                        ours.setdefault("timing", {})[stage] = t
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, path)


def report(path: Path, results: dict[str, Any], plots: bool = True) -> None:
    """Summaries into the JSON; the markdown report and plots beside it."""
    for setting in results["settings"].values():
        setting["summary"] = claims_report.summarise(setting)
    save(path, results)
    notes = path.with_name(f"{path.stem}_notes.md")
    text = claims_report.markdown(results, notes.read_text() if notes.is_file() else "")
    path.with_suffix(".md").write_text(text)
    if plots:
        claims_report.plot(results, path.with_name(f"{path.stem}_curves.png"),
                           path.with_name(f"{path.stem}_lr.png"), path.with_name(f"{path.stem}_drift.png"))


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------

def grid(spec: dict[str, Any], part: str) -> list[tuple[str, float, int, int]]:
    """The stage's runs, seed-major, so a stage cut short leaves whole seeds (paired across optimizers)."""
    extra = spec.get("extra", [])
    optimizers = [o for o in spec["optimizers"] if (o in extra) == (part == "extra")]
    return [(o, lr, s, bs) for s in spec["seeds"] for bs in spec["batch_sizes"] for lr in spec["learning_rates"]
            for o in optimizers]


def run_stage(stage: str, specs: dict[str, dict[str, Any]], results: dict[str, Any], path: Path,
              deadline: float | None, seeds: list[int] | None = None) -> bool:
    """Run the missing runs of a stage (of ``seeds`` only, if given); returns False if the deadline stopped it.

    Processes given disjoint ``seeds`` can run the same stage side by side (the file is merged on
    every save); each keeps its own wall-time entry.
    """
    name, part = stage.split(":")
    spec = specs[name]
    if seeds is not None:
        spec = {**spec, "seeds": [s for s in spec["seeds"] if s in seeds]}
        stage_label = f"{stage} (seeds {', '.join(map(str, spec['seeds']))})"
    else:
        stage_label = stage
    entry = results["settings"][name]
    if spec["kind"] != "clip":
        from benchmarks.claims_diffusion import trainer_has_callbacks

        if not trainer_has_callbacks():
            print(f"[{stage}] skipped: the trainers take no callbacks= yet (difflora.train.engine)", flush=True)
            return True
    _OWN_STAGES.add(stage_label)
    done = {_key(r["optimizer"], r["lr"], r["seed"], r["batch_size"]) for r in entry["runs"]}
    todo = [g for g in grid(spec, part) if _key(*g) not in done]
    total = len(grid(spec, part))
    print(f"[{stage}] {total - len(todo)} of {total} runs done, {len(todo)} to run", flush=True)
    if not todo:
        return True
    t0 = time.perf_counter()
    load_start = round(os.getloadavg()[0], 1)
    count, finished = 0, True
    try:
        for optimizer, lr, seed, bs in todo:
            if deadline is not None and time.time() > deadline:
                finished = False
                break
            record = run_one(spec, optimizer, lr, seed, bs)
            entry["runs"].append(record)
            count += 1
            final = record["eval_loss"][-1] if record["eval_loss"] else None
            note = "" if record["diverged_at"] is None else f" (diverged at step {record['diverged_at']})"
            shown = "-" if final is None else f"{final:.4g}"
            print(f"[{stage}] {optimizer} lr={lr:g} seed={seed} bs={bs}: final eval loss {shown}{note} "
                  f"in {record['seconds']:.1f}s", flush=True)
            _add_time(entry, stage_label, t0, count, load_start)
            save(path, results)
            t0 = time.perf_counter()
            count = 0
    finally:
        _add_time(entry, stage_label, t0, count, load_start)
        save(path, results)
    spent = entry["timing"].get(stage_label, {}).get("seconds", 0.0)
    print(f"[{stage}] {'finished' if finished else 'stopped at the deadline'}; stage wall time so far "
          f"{spent / 60:.1f} min", flush=True)
    return finished


def _add_time(entry: dict[str, Any], stage: str, t0: float, count: int, load_start: float) -> None:
    t = entry["timing"].setdefault(stage, {"seconds": 0.0, "runs": 0, "load_average": []})
    t["seconds"] = round(t["seconds"] + time.perf_counter() - t0, 1)
    t["runs"] += count
    if count:
        load = round(os.getloadavg()[0], 1)
        t["load_average"] = [min([load_start, load, *t["load_average"]]), max([load_start, load, *t["load_average"]])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid of every setting (<= 5 minutes)")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/claims.json; "
                        "--quick: outputs/claims-quick/claims.json)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages (default: all, in order)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds of the stages (e.g. to split "
                        "a stage between two processes)")
    parser.add_argument("--report", action="store_true", help="only rebuild summary, tables and plots")
    parser.add_argument("--max-minutes", type=float, help="stop starting new runs after this long (resumable)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    import torch

    # One thread: two threads on 2 shared cores were ~10x slower per step than one under load.
    torch.set_num_threads(1)
    specs = settings(args.quick)
    path = args.out or (ROOT / "outputs" / "claims-quick" / "claims.json" if args.quick else RESULTS / "claims.json")
    results = load(path, specs)
    if not args.report:
        deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
        for stage in args.stages or STAGES:
            if not run_stage(stage, specs, results, path, deadline, args.seeds):
                break
    report(path, results, plots=not (args.no_plots or (args.quick and not args.report)))
    print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
