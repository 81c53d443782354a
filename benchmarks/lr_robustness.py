"""Learning-rate robustness: AdamW vs scaled AdamW, SGD vs scaled GD, over six decades.

Runs ``difflora sweep --config configs/sweeps/toy.yaml``: DreamBooth of the checkered-star concept
on the pretrained toy Stable Diffusion, scored by the toy CLIP, 4 optimizers x 7 learning rates x
3 seeds. Prints the sweep's summary table and copies it with its plots to ``benchmarks/results/``
(``lr_robustness.md``, ``lr_robustness_<metric>.png``). Finished runs are reused, so a second call
only prints. Extra arguments go to the sweep (``--seeds 0 1``, ``--output_dir DIR``).

    python benchmarks/lr_robustness.py            # about an hour on 2 CPU cores
    python benchmarks/lr_robustness.py --reg      # the reg choice: scaled optimizers, reg 0 .. 1e-2
    python benchmarks/lr_robustness.py --tiny     # the random-weight tiny model: machinery only

``--reg`` runs the same sweep (one seed) for ``scaled_adamw`` and ``scaled_sgd`` once per reg in
``REGS`` (each into ``outputs/sweep-toy-reg/reg-<reg>``) and writes ``lr_robustness_reg.md``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REGS = (0.0, 1e-6, 1e-4, 1e-2)


def reg_sweep(argv: list[str]) -> None:
    """One sweep per reg (scaled optimizers only); a table of best score and 90% band per reg."""
    import yaml

    from difflora import sweep
    from difflora.config import parse_config

    base_cfg = yaml.safe_load((ROOT / "configs" / "sweeps" / "toy.yaml").read_text())
    root = ROOT / "outputs" / "sweep-toy-reg"
    lines = ["# Choosing reg on the toy world", "",
             "`python benchmarks/lr_robustness.py --reg`: the toy sweep (configs/sweeps/toy.yaml, seed 0) "
             "for the scaled optimizers at each reg. Best seed-0 score (its lr) and the width in decades of "
             "the learning-rate band reaching 90% of it.", "",
             "| reg | optimizer | best CLIP-I (lr) | CLIP-I band | best CLIP-T (lr) | CLIP-T band | diverged |",
             "|---|---|---|---|---|---|---|"]
    for reg in REGS:
        cfg = dict(base_cfg, optimizers=["scaled_adamw", "scaled_sgd"], seeds=[0],
                   output_dir=str(root / f"reg-{reg:g}"), base={**base_cfg["base"], "optimizer_reg": reg})
        path = root / f"reg-{reg:g}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        parsed = parse_config(sweep.SweepConfig, ["--config", str(path), *argv], prog="lr_robustness --reg")
        rows = sweep.sweep(parsed)
        summary = sweep.summarise(rows, ["clip_i", "clip_t"])
        for opt, e in summary.items():
            cells = []
            for m in ("clip_i", "clip_t"):
                s = e.get(m)
                cells += ["-", "-"] if s is None else [f"{s['best']:.3f} ({s['best_lr']:g})",
                                                       "-" if s["band_decades"] is None else f"{s['band_decades']:.2f}"]
            lines.append(f"| {reg:g} | {opt} | " + " | ".join(cells) + f" | {e['diverged']} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lr_robustness_reg.md").write_text(text)
    print(text)


def main(argv: list[str]) -> None:
    from difflora.errors import exit_on_user_error

    os.chdir(ROOT)  # the configs name repo-relative paths
    if "--reg" in argv:
        exit_on_user_error(lambda: reg_sweep([a for a in argv if a != "--reg"]), prog="lr_robustness")
        return
    config, out = "configs/sweeps/toy.yaml", ROOT / "outputs" / "sweep-toy"
    if "--tiny" in argv:
        argv = [a for a in argv if a != "--tiny"]
        config, out = "configs/sweeps/tiny.yaml", None
        if not (ROOT / "outputs" / "tiny-model" / "model_index.json").is_file():
            from difflora.tiny_models import make_tiny_model

            make_tiny_model(ROOT / "outputs" / "tiny-model")
    if "--output_dir" in argv:
        out = Path(argv[argv.index("--output_dir") + 1])
    from difflora import sweep

    exit_on_user_error(lambda: sweep.main(["--config", config, *argv]), prog="lr_robustness")
    if out is not None and (out / "summary.md").is_file():
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.md", RESULTS / "lr_robustness.md")
        for plot in out.glob("plot_*.png"):
            shutil.copyfile(plot, RESULTS / f"lr_robustness_{plot.stem[5:]}.png")
        print(f"copied the summary and plots to {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:])
