"""benchmarks/claims.py --quick: the results layout, eval curves of >= 10 points, determinism, statistics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import claims, claims_report

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {"optimizer", "lr", "seed", "batch_size", "steps", "eval_loss", "prior_drift", "seconds", "diverged_at"}


def _diffusion_hook() -> bool:
    from benchmarks.claims_diffusion import trainer_has_callbacks

    return trainer_has_callbacks()


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, float]:
    out = tmp_path_factory.mktemp("claims") / "claims.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text()), seconds


def test_quick_finishes_in_five_minutes(quick):
    assert quick[1] <= 300, f"--quick took {quick[1]:.0f} s"


def test_results_layout(quick):
    results, _ = quick
    assert set(results) == {"settings"}
    assert set(results["settings"]) == set(claims.SETTINGS)
    hook = _diffusion_hook()
    for name, setting in results["settings"].items():
        for key in ("optimizers", "learning_rates", "seeds", "batch_sizes", "runs", "summary"):
            assert key in setting, (name, key)
        if setting["kind"] != "clip" and not hook:
            continue  # the trainers' callbacks hook is not there: nothing ran
        spec = claims.settings(quick=True)[name]
        expected = len(spec["optimizers"]) * len(spec["learning_rates"]) * len(spec["seeds"]) * len(spec["batch_sizes"])
        assert len(setting["runs"]) == expected, name
        for run in setting["runs"]:
            assert RUN_KEYS <= set(run), (name, RUN_KEYS - set(run))
            assert len(run["steps"]) >= 10 and len(run["eval_loss"]) == len(run["steps"]) == len(run["prior_drift"])
            assert run["steps"][0] == 0 and run["prior_drift"][0] == 0.0  # B = 0: the base model at step 0
            if run["diverged_at"] is None:
                assert all(math.isfinite(v) for v in run["eval_loss"])
        by_bs = setting["summary"]["by_batch_size"]
        assert set(by_bs) == {str(b) for b in setting["batch_sizes"]}
        for summ in by_bs.values():
            for opt, entry in summ["optimizers"].items():
                assert opt in setting["optimizers"]
                assert {"best_lr", "band_decades", "band_ci", "steps_to_50", "steps_to_90", "by_lr"} <= set(entry)
                assert len(entry["by_lr"]) == len(setting["learning_rates"])


def test_rerun_skips_finished_runs(quick, tmp_path):
    results, _ = quick
    out = tmp_path / "claims.json"
    out.write_text(json.dumps(results))
    import torch

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        claims.main(["--quick", "--out", str(out), "--stages", "clip_pattern:core", "--no-plots"])
    finally:
        torch.set_num_threads(threads)
    assert time.perf_counter() - t0 < 60
    assert len(json.loads(out.read_text())["settings"]["clip_pattern"]["runs"]) == \
        len(results["settings"]["clip_pattern"]["runs"])


def test_a_clip_run_is_deterministic():
    spec = claims.settings(quick=True)["clip_pattern"]
    first = claims.run_one(spec, "scaled_adamw", 1e-2, 3, 8)
    second = claims.run_one(spec, "scaled_adamw", 1e-2, 3, 8)
    assert first["eval_loss"] == second["eval_loss"] and first["prior_drift"] == second["prior_drift"]
    other = claims.run_one(spec, "adamw", 1e-2, 3, 8)
    assert other["eval_loss"][0] == first["eval_loss"][0]  # paired: same start for every optimizer
    assert other["eval_loss"][-1] != first["eval_loss"][-1]


@pytest.mark.skipif(not _diffusion_hook(), reason="the trainers take no callbacks= yet")
@pytest.mark.parametrize("kind", ["dreambooth", "edlora"])
def test_a_diffusion_run_is_deterministic(kind):
    from benchmarks.claims_diffusion import run

    first = run(kind, "scaled_adamw", 1e-2, 0, 1, 4, 1)
    second = run(kind, "scaled_adamw", 1e-2, 0, 1, 4, 1)
    assert len(first["eval_loss"]) == 5
    assert first["eval_loss"] == second["eval_loss"] and first["prior_drift"] == second["prior_drift"]


def _run(opt, lr, seed, finals, l0=1.0):
    losses = [l0, *finals]
    return {"optimizer": opt, "lr": lr, "seed": seed, "batch_size": 1, "steps": list(range(len(losses))),
            "eval_loss": losses, "prior_drift": [0.0] * len(losses), "diverged_at": None}


def test_band_convergence_and_pairs_on_a_made_up_grid():
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    curves = {  # final losses per lr: "wide" stays within 10% over 2 decades, "narrow" over none
        "adamw": {1e-3: 0.9, 1e-2: 0.5, 1e-1: 0.8, 1.0: math.inf},
        "scaled_adamw": {1e-3: 0.54, 1e-2: 0.5, 1e-1: 0.52, 1.0: 0.9},
    }
    runs = []
    for opt, by_lr in curves.items():
        for lr, final in by_lr.items():
            for seed in range(4):
                jitter = 0.001 * seed
                if math.isinf(final):
                    r = _run(opt, lr, seed, [0.9])
                    r["diverged_at"] = 1
                elif opt == "adamw":
                    r = _run(opt, lr, seed, [0.95, 0.7, final + jitter])  # slow: reaches the target at step 3
                else:
                    r = _run(opt, lr, seed, [0.5 + jitter, final + jitter, final + jitter])
                runs.append(r)
    setting = {"optimizers": list(curves), "learning_rates": lrs, "seeds": list(range(4)), "batch_sizes": [1],
               "runs": runs}
    summ = claims_report.summarise(setting)["by_batch_size"]["1"]
    adam, scaled = summ["optimizers"]["adamw"], summ["optimizers"]["scaled_adamw"]
    assert adam["best_lr"] == 1e-2 and scaled["best_lr"] == 1e-2
    assert adam["band_decades"] == 0.0 and scaled["band_decades"] == pytest.approx(2.0)
    assert adam["by_lr"][3]["diverged"] == 4 and adam["by_lr"][3]["final_eval_loss"] is None
    assert adam["steps_to_90"]["mean"] == 3 and scaled["steps_to_90"]["mean"] == 1
    assert adam["steps_to_50"]["mean"] == 2 and scaled["steps_to_50"]["mean"] == 1
    pair = summ["paired"]["scaled_adamw - adamw"]
    assert pair["steps_to_90"]["mean"] == -2
    assert pair["band_decades"]["point"] == pytest.approx(2.0)
    assert pair["final_eval_loss"]["mean"] == pytest.approx(0.0, abs=1e-9)
    text = claims_report.markdown({"settings": {"made_up": {**setting, "summary": {"by_batch_size": {"1": summ}}}}})
    assert "| scaled_adamw - adamw |" in text


def test_t_interval():
    ci = claims_report.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["hi"] - 2.0 == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert claims_report.mean_ci([math.inf, None]) is None
