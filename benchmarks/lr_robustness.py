"""Learning-rate robustness: AdamW vs scaled AdamW, SGD vs scaled GD, over six decades.

Runs ``difflora sweep --config configs/sweeps/toy.yaml``: DreamBooth of the checkered-star concept
on the pretrained toy Stable Diffusion, scored by the toy CLIP, 4 optimizers x 7 learning rates x
3 seeds. Prints the sweep's summary table and copies it with its plots to ``benchmarks/results/``
(``lr_robustness.md``, ``lr_robustness_<metric>.png``). Finished runs are reused, so a second call
only prints. Extra arguments go to the sweep (``--seeds 0 1``, ``--output_dir DIR``).

    python benchmarks/lr_robustness.py            # about an hour on 2 CPU cores
    python benchmarks/lr_robustness.py --tiny     # the random-weight tiny model: machinery only
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str]) -> None:
    from difflora.errors import exit_on_user_error

    os.chdir(ROOT)  # the configs name repo-relative paths
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
