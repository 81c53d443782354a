"""Learning-rate robustness: AdamW vs scaled AdamW, SGD vs scaled GD, over four decades.

Runs ``difflora sweep --config configs/sweeps/tiny.yaml`` (building the offline tiny model in
``outputs/tiny-model`` first if it is missing) and prints the sweep's summary table. Finished runs
are reused, so a second call only prints. Extra arguments go to the sweep, e.g. ``seeds=[0,1]``
is written ``--seeds 0 1``.

    python benchmarks/lr_robustness.py                       # a few minutes on 2 CPU cores
    python benchmarks/lr_robustness.py --output_dir outputs/sweep-tiny-2 --seeds 0 1 2
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> None:
    from difflora.errors import exit_on_user_error

    os.chdir(ROOT)  # the config names repo-relative paths
    if not (ROOT / "outputs" / "tiny-model" / "model_index.json").is_file():
        from difflora.tiny_models import make_tiny_model

        make_tiny_model(ROOT / "outputs" / "tiny-model")
    from difflora import sweep

    exit_on_user_error(lambda: sweep.main(["--config", "configs/sweeps/tiny.yaml", *argv]), prog="lr_robustness")


if __name__ == "__main__":
    main(sys.argv[1:])
