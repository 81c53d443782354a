"""Statistics, plots and the markdown report of benchmarks/claims.py.

Every figure is computed from the runs in ``claims.json`` alone, so the summary can be rebuilt at any
time (``python benchmarks/claims.py --report``).

Definitions (per setting and batch size):

* final eval loss of a run: its last eval point; a run that diverged counts as +inf (never best,
  never in a band) and is reported by count, never averaged.
* mean and 95% interval: over seeds, Student t (n - 1 degrees of freedom).
* best lr of an optimizer: the grid lr with the lowest seed-mean final eval loss.
* robustness band: the contiguous grid lrs around the best lr whose seed-mean final eval loss is
  within 10% of the best (<= 1.1 x best); its width is log10(highest / lowest lr) in decades (0 when
  only the best lr qualifies), measured on the grid, so its resolution is the grid spacing.
  Interval: percentile bootstrap over seeds (2000 resamples of the seeds, the same resample for
  every optimizer, so differences between optimizers are paired).
* convergence: eval steps a run needs to make 50% and 90% of the best improvement, i.e. the first
  eval step whose loss is <= L0 - p (L0 - L*), p = 0.5, 0.9, with L0 the run's step-0 eval loss and
  L* the lowest seed-mean final eval loss of any optimizer and lr at that batch size (one target
  for all optimizers). Reported at each optimizer's best lr: mean over the seeds that reach it
  (t interval), and how many reach it; its resolution is the eval interval.
* paired differences (e.g. scaled_adamw - adamw): per seed, each optimizer at its own best lr;
  mean and t interval over seeds. The best lrs are chosen on the same seeds (a small optimism
  shared by both sides).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

BAND = 1.10  # within 10% of the best final eval loss
FRACTIONS = (0.5, 0.9)  # convergence: shares of the best improvement (steps_to_50, steps_to_90)
BOOTSTRAP = 2000
PAIRS = (("scaled_adamw", "adamw"), ("scaled_sgd", "sgd"), ("scaled_adamw_official", "scaled_adamw"),
         ("scaled_adamw_official", "adamw"), ("peft_riemannian", "adamw"), ("loraplus", "adamw"))

# two-sided 95% Student t quantiles, df = 1 .. 30
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96 + 2.4 / df


def mean_ci(values: Sequence[float]) -> dict[str, Any] | None:
    """Mean and 95% t interval of finite values; None if there are none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return None
    m = float(v.mean())
    if len(v) == 1:
        return {"mean": m, "lo": None, "hi": None, "n": 1}
    half = t95(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": int(len(v))}


def final_loss(run: dict[str, Any], key: str = "eval_loss") -> float:
    """The run's last eval value, +inf if it diverged or has none."""
    if run.get("diverged_at") is not None:
        return math.inf
    values = run.get(key)
    if isinstance(values, (int, float)):  # end-of-run figures (clip_i, clip_t)
        return float(values) if math.isfinite(values) else math.inf
    values = values or []
    if not values or values[-1] is None or not math.isfinite(values[-1]):
        return math.inf
    return float(values[-1])


def _finals(index: dict, opt: str, lrs: Sequence[float], seeds: Sequence[int], key: str = "eval_loss") -> np.ndarray:
    """(lr, seed) array of final values of one optimizer (runs must exist)."""
    return np.asarray([[final_loss(index[(opt, lr, s)], key) for s in seeds] for lr in lrs], dtype=float)


def _band(means: np.ndarray, lrs: Sequence[float]) -> tuple[int | None, float | None]:
    """(index of the best lr, band width in decades) for seed-mean final losses over the lr grid."""
    finite = np.isfinite(means)
    if not finite.any():
        return None, None
    best = int(np.argmin(np.where(finite, means, np.inf)))
    limit = means[best] * BAND if means[best] >= 0 else means[best] / BAND
    lo = hi = best
    while lo - 1 >= 0 and np.isfinite(means[lo - 1]) and means[lo - 1] <= limit:
        lo -= 1
    while hi + 1 < len(means) and np.isfinite(means[hi + 1]) and means[hi + 1] <= limit:
        hi += 1
    return best, math.log10(lrs[hi] / lrs[lo])


def _boot_bands(mat: np.ndarray, lrs: Sequence[float], n_seeds: int) -> np.ndarray:
    """Band widths of BOOTSTRAP resamples of the seeds (a fixed generator: the same resamples for
    every optimizer with the same number of seeds, so differences over common seeds are paired)."""
    rng = np.random.default_rng(0)
    boot = rng.integers(0, n_seeds, size=(BOOTSTRAP, n_seeds))
    return np.array([_band(mat[:, b].mean(axis=1), lrs)[1] for b in boot], dtype=float)


def _target(run: dict[str, Any], l_star: float, fraction: float) -> float | None:
    """The run's convergence target L0 - fraction (L0 - L*); None when L* is no better than L0."""
    l0 = run["eval_loss"][0] if run["eval_loss"] else None
    if l0 is None or not math.isfinite(l_star) or l_star >= l0:
        return None
    return l0 - fraction * (l0 - l_star)


def _steps_to(run: dict[str, Any], l_star: float, fraction: float) -> int | None:
    """First eval step at or below the run's target (None: never, or no target)."""
    target = _target(run, l_star, fraction)
    if target is None:
        return None
    for step, loss in zip(run["steps"], run["eval_loss"]):
        if loss is not None and math.isfinite(loss) and loss <= target:
            return int(step)
    return None


def summarise(setting: dict[str, Any]) -> dict[str, Any]:
    """The summary of one setting (see the module docstring for the definitions).

    Per optimizer, only seeds whose whole lr grid has run count (so a stage cut short still gives
    paired figures); paired differences use the seeds both optimizers completed.
    """
    runs = setting["runs"]
    lrs = sorted(setting["learning_rates"])
    out: dict[str, Any] = {"definitions": {"band": f"seed-mean final eval loss <= {BAND:g} x best",
                                           "convergence": "steps_to_<p>: first eval step with loss <= "
                                                          "L0 - p/100 (L0 - L*)",
                                           "interval": "95%, t over seeds; bands: bootstrap over seeds"},
                           "by_batch_size": {}}
    extra_keys = [k for k in ("eval_acc", "prior_drift", "prior_loss", "clip_i", "clip_t")
                  if any(k in r for r in runs)]
    for bs in setting["batch_sizes"]:
        index = {(r["optimizer"], r["lr"], r["seed"]): r for r in runs if r["batch_size"] == bs}
        all_seeds = sorted({s for (_, _, s) in index})
        complete = {o: [s for s in all_seeds if all((o, lr, s) in index for lr in lrs)]
                    for o in setting["optimizers"]}
        optimizers = [o for o in setting["optimizers"] if complete[o]]
        if not optimizers:
            continue
        mats = {o: _finals(index, o, lrs, complete[o]) for o in optimizers}
        with np.errstate(invalid="ignore"):
            means = {o: m.mean(axis=1) for o, m in mats.items()}
        candidates = [float(v) for m in means.values() for v in m if np.isfinite(v)]
        l_star = min(candidates) if candidates else math.nan
        per_opt: dict[str, Any] = {}
        best_index: dict[str, int | None] = {}
        for opt in optimizers:
            seeds, mat = complete[opt], mats[opt]
            table = []
            for j, lr in enumerate(lrs):
                vals = mat[j]
                cell: dict[str, Any] = {"lr": lr, "diverged": int(np.isinf(vals).sum())}
                cell["final_eval_loss"] = mean_ci(vals) if not np.isinf(vals).any() else None
                for key in extra_keys:
                    finals = [final_loss(index[(opt, lr, s)], key) for s in seeds]
                    cell[key] = mean_ci(finals) if cell["diverged"] == 0 else None
                table.append(cell)
            best, width = _band(means[opt], lrs)
            best_index[opt] = best
            entry: dict[str, Any] = {"seeds": seeds, "by_lr": table, "best_lr": None if best is None else lrs[best],
                                     "band_decades": width,
                                     "band_ci": _percentiles(_boot_bands(mat, lrs, len(seeds)))}
            if best is not None:
                entry["best_final_eval_loss"] = mean_ci(mat[best])
                best_runs = [index[(opt, lrs[best], s)] for s in seeds]
                for fraction in FRACTIONS:
                    steps = [_steps_to(r, l_star, fraction) for r in best_runs]
                    reached = [s for s in steps if s is not None]
                    entry[f"steps_to_{round(100 * fraction)}"] = {"per_seed": steps, "reached": len(reached),
                                                                   "of": len(steps), **(mean_ci(reached) or {})}
                for key in extra_keys:
                    entry[f"best_{key}"] = mean_ci([final_loss(r, key) for r in best_runs])
            per_opt[opt] = entry
        pairs = {}
        for a, b in PAIRS:
            if a not in per_opt or b not in per_opt or best_index[a] is None or best_index[b] is None:
                continue
            common = [s for s in complete[a] if s in complete[b]]
            if not common:
                continue
            la, lb = lrs[best_index[a]], lrs[best_index[b]]
            fa, fb = _finals(index, a, lrs, common), _finals(index, b, lrs, common)
            diff = fa[best_index[a]] - fb[best_index[b]]
            wa, wb = _band(fa.mean(axis=1), lrs)[1], _band(fb.mean(axis=1), lrs)[1]
            point = None if wa is None or wb is None else wa - wb
            pair: dict[str, Any] = {
                "seeds": common,
                "final_eval_loss": mean_ci(diff) if np.isfinite(diff).all() else None,
                "band_decades": _percentiles(_boot_bands(fa, lrs, len(common)) - _boot_bands(fb, lrs, len(common)),
                                             point=point)}
            for fraction in FRACTIONS:
                steps = []
                for s in common:
                    ra, rb = index[(a, la, s)], index[(b, lb, s)]
                    xa, xb = _steps_to(ra, l_star, fraction), _steps_to(rb, l_star, fraction)
                    if xa is not None and xb is not None:
                        steps.append(xa - xb)
                pair[f"steps_to_{round(100 * fraction)}"] = mean_ci(steps)
            for key in ("prior_drift", "eval_acc"):
                if key in extra_keys:
                    pair[key] = mean_ci([final_loss(index[(a, la, s)], key) - final_loss(index[(b, lb, s)], key)
                                         for s in common])
            pairs[f"{a} - {b}"] = pair
        out["by_batch_size"][str(bs)] = {"seeds": all_seeds, "L_star": l_star, "optimizers": per_opt,
                                         "paired": pairs}
    return out


def _percentiles(samples: np.ndarray, point: float | None = None) -> dict[str, Any] | None:
    s = samples[np.isfinite(samples)]
    if len(s) == 0:
        return None
    out = {"lo": float(np.percentile(s, 2.5)), "hi": float(np.percentile(s, 97.5)), "valid": int(len(s))}
    if point is not None and math.isfinite(point):
        out["point"] = point
    return out


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def _curve_stats(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    ok = [r for r in runs if r.get("diverged_at") is None]
    if not ok:
        return None
    n = min(len(r["steps"]) for r in ok)
    steps = np.asarray(ok[0]["steps"][:n], dtype=float)
    y = np.asarray([r["eval_loss"][:n] for r in ok], dtype=float)
    m = y.mean(0)
    if len(ok) > 1:
        half = t95(len(ok) - 1) * y.std(0, ddof=1) / math.sqrt(len(ok))
    else:
        half = np.zeros_like(m)
    return steps, m, m - half, m + half


def plot(results: dict[str, Any], out_curves, out_lr, out_drift=None) -> None:
    """Eval loss vs step (best lr per optimizer, 95% bands) and final eval loss vs lr, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in results["settings"].items() if s.get("summary", {}).get("by_batch_size")]
    if not names:
        return
    n_bs = max(len(results["settings"][n]["summary"]["by_batch_size"]) for n in names)
    colours = {"adamw": "C0", "scaled_adamw": "C1", "sgd": "C2", "scaled_sgd": "C3", "loraplus": "C4",
               "peft_riemannian": "C5", "scaled_adamw_official": "C6"}
    styles = {"adamw": "-", "scaled_adamw": "-", "sgd": "--", "scaled_sgd": "--", "loraplus": ":",
              "peft_riemannian": ":", "scaled_adamw_official": "-."}

    def grid():
        fig, axes = plt.subplots(n_bs, len(names), figsize=(5.2 * len(names), 3.6 * n_bs), squeeze=False)
        return fig, axes

    fig, axes = grid()
    for c, name in enumerate(names):
        setting = results["settings"][name]
        for r, (bs, summ) in enumerate(setting["summary"]["by_batch_size"].items()):
            ax = axes[r, c]
            for opt, entry in summ["optimizers"].items():
                if entry["best_lr"] is None:
                    continue
                runs = [x for x in setting["runs"] if x["optimizer"] == opt and x["lr"] == entry["best_lr"]
                        and x["batch_size"] == int(bs) and x["seed"] in entry["seeds"]]
                stats = _curve_stats(runs)
                if stats is None:
                    continue
                steps, m, lo, hi = stats
                ax.plot(steps, m, styles.get(opt, "-"), color=colours.get(opt), label=f"{opt} (lr {entry['best_lr']:g})")
                ax.fill_between(steps, lo, hi, color=colours.get(opt), alpha=0.2)
            ax.set(title=f"{name}, batch {bs}", xlabel="step", ylabel=setting.get("loss_label", "eval loss"))
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_curves, dpi=90)
    plt.close(fig)

    for key, path, label in (("final_eval_loss", out_lr, "final eval loss"), ("prior_drift", out_drift, "prior drift")):
        if path is None:
            continue
        fig, axes = grid()
        for c, name in enumerate(names):
            setting = results["settings"][name]
            for r, (bs, summ) in enumerate(setting["summary"]["by_batch_size"].items()):
                ax = axes[r, c]
                for opt, entry in summ["optimizers"].items():
                    xs, ys, lo, hi, div = [], [], [], [], []
                    for cell in entry["by_lr"]:
                        v = cell.get(key)
                        if v is None:
                            if cell["diverged"]:
                                div.append(cell["lr"])
                            continue
                        xs.append(cell["lr"])
                        ys.append(v["mean"])
                        lo.append(v["mean"] - (v["lo"] if v["lo"] is not None else v["mean"]))
                        hi.append((v["hi"] if v["hi"] is not None else v["mean"]) - v["mean"])
                    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o" + styles.get(opt, "-"), ms=3, capsize=2,
                                color=colours.get(opt), label=opt)
                    if div:
                        top = max(ys) if ys else 1.0
                        ax.plot(div, [top] * len(div), "x", color=colours.get(opt))
                ax.set(xscale="log", yscale="log", title=f"{name}, batch {bs}", xlabel="learning rate",
                       ylabel=label + (" (x: a seed diverged)" if key == "final_eval_loss" else ""))
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------

def fmt_ci(v: dict[str, Any] | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if v.get("lo") is None:
        return f"{v['mean']:.{digits}g}"
    return f"{v['mean']:.{digits}g} [{v['lo']:.{digits}g}, {v['hi']:.{digits}g}]"


def fmt_band(width: float | None, ci: dict[str, Any] | None) -> str:
    if width is None:
        return "-"
    return f"{width:.1f}" + ("" if ci is None else f" [{ci['lo']:.1f}, {ci['hi']:.1f}]")


def markdown(results: dict[str, Any], notes: str = "") -> str:
    lines = ["# Convergence and learning-rate robustness, judged by held-out loss", "",
             "Written by `python benchmarks/claims.py` from `benchmarks/results/claims.json` "
             "(definitions in `benchmarks/claims_report.py`). Intervals are 95%: t over seeds for means and "
             "paired differences, percentile bootstrap over seeds for band widths.", ""]
    if notes.strip():
        lines += [notes.strip(), ""]
    for name, setting in results["settings"].items():
        summ = setting.get("summary", {}).get("by_batch_size", {})
        lines += [f"## {name}", "", setting.get("description", ""), ""]
        timing = setting.get("timing", {})
        if timing:
            lines.append("Time per stage (2 shared CPU cores, niced, one thread per process, under load from other "
                         "jobs; wall time counts waiting for the cores, CPU time does not): " + "; ".join(
                             f"`{stage}` {t['runs']} runs, wall {t['seconds'] / 60:.1f} min"
                             for stage, t in timing.items()) + ".")
            cpu = [r for r in setting["runs"] if r.get("cpu_seconds") is not None]
            if cpu:
                per_bs = "; ".join(
                    f"batch {bs}: {np.mean([r['cpu_seconds'] for r in cpu if r['batch_size'] == bs]):.0f} s per run"
                    for bs in setting["batch_sizes"] if any(r["batch_size"] == bs for r in cpu))
                lines.append(f"CPU time of the {len(cpu)} runs that recorded it: "
                             f"{sum(r['cpu_seconds'] for r in cpu) / 60:.1f} min ({per_bs}).")
            lines.append("")
        lines.append(f"Grid: optimizers {', '.join(setting['optimizers'])}; learning rates "
                     f"{', '.join(f'{x:g}' for x in sorted(setting['learning_rates']))}; batch sizes "
                     f"{', '.join(map(str, setting['batch_sizes']))}; seeds {', '.join(map(str, setting['seeds']))}. "
                     f"Runs recorded: {len(setting['runs'])}.")
        lines.append("")
        for bs, s in summ.items():
            extra = [k for k in ("eval_acc", "prior_drift") if any(f"best_{k}" in e for e in s["optimizers"].values())]
            lines += [f"### batch size {bs} (seeds {', '.join(map(str, s['seeds']))}; L* = {s['L_star']:.4g})", "",
                      "| optimizer | seeds | best lr | final eval loss at best lr | band (decades) | steps to 50% "
                      "(reached) | steps to 90% (reached) | " + " | ".join(f"{k} at best lr" for k in extra) + " |",
                      "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
            for opt, e in s["optimizers"].items():
                cells = []
                for p in (50, 90):
                    st = e.get(f"steps_to_{p}", {})
                    cells.append("-" if not st else
                                 f"{fmt_ci(st if 'mean' in st else None, 3)} ({st['reached']}/{st['of']})")
                best_lr = "-" if e["best_lr"] is None else f"{e['best_lr']:g}"
                lines.append(f"| {opt} | {len(e['seeds'])} | {best_lr} | {fmt_ci(e.get('best_final_eval_loss'))} | "
                             f"{fmt_band(e['band_decades'], e['band_ci'])} | {' | '.join(cells)} | "
                             + " | ".join(fmt_ci(e.get(f"best_{k}")) for k in extra) + " |")
            if s["paired"]:
                lines += ["", "Paired differences (first minus second, each at its own best lr; negative loss / "
                          "steps / drift = first is better, positive band = first is more robust):", "",
                          "| pair | final eval loss | band (decades) | steps to 50% | steps to 90% | "
                          + " | ".join(extra) + " |", "|---|---|---|---|---|" + "---|" * len(extra)]
                for pair, d in s["paired"].items():
                    band = d["band_decades"]
                    band_s = "-" if band is None else (f"{band.get('point', float('nan')):.1f} "
                                                       f"[{band['lo']:.1f}, {band['hi']:.1f}]")
                    lines.append(f"| {pair} | {fmt_ci(d['final_eval_loss'])} | {band_s} | "
                                 f"{fmt_ci(d['steps_to_50'], 3)} | {fmt_ci(d['steps_to_90'], 3)} | "
                                 + " | ".join(fmt_ci(d.get(k)) for k in extra) + " |")
            lines += ["", "Final eval loss by learning rate (seed mean [95% interval]; d = seeds diverged):", "",
                      "| lr | " + " | ".join(s["optimizers"]) + " |", "|---|" + "---|" * len(s["optimizers"])]
            for j, lr in enumerate(sorted(setting["learning_rates"])):
                cells = []
                for e in s["optimizers"].values():
                    c = e["by_lr"][j]
                    cells.append(f"d{c['diverged']}" if c["final_eval_loss"] is None else fmt_ci(c["final_eval_loss"], 3)
                                 + (f" d{c['diverged']}" if c["diverged"] else ""))
                lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"
