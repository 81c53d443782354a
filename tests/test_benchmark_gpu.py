"""benchmarks/gpu.py --smoke: every cell of both tables measured, with positive numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_COLUMNS = ("trainer s/step", "bare s/step", "trainer / bare", "trainer peak", "bare peak")
OPTIM_COLUMNS = ("LoRA params", "AdamW ms", "AdamW fused ms", "ScaledAdamW ms", "peft Riemannian ms",
                 "ScaledAdamW / AdamW", "ScaledAdamW / AdamW fused", "peft / ScaledAdamW")


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table of ``text`` as a list of rows keyed by the header cells."""
    tables, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables.append([])
        elif not set("".join(cells)) <= set("-:"):
            tables[-1].append(dict(zip(header, cells)))
    return tables


def _number(row: dict[str, str], prefix: str) -> float:
    (key,) = [k for k in row if k == prefix] or [k for k in row if k.startswith(prefix)]
    return float(row[key].replace(",", ""))


def test_smoke_writes_every_cell(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # A generous budget: on a busy machine no cell may be skipped for time.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--output", str(out),
                           "--time-budget", "900"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "smoke" in text
    train, optim = _tables(text)

    keys = {(r["model"], r["dtype"], r["batch"], r["grad ckpt"]) for r in train}
    assert keys == {(m, d, b, g) for m in ("SD1.5", "SDXL") for d in ("fp16", "bf16") for b in ("1", "4")
                    for g in ("off", "on")}
    assert len(train) == 16
    for row in train:
        for col in TRAIN_COLUMNS:
            assert _number(row, col) > 0, (row, col)
        assert row["bare + compile s/step"] in ("-", "n/a")  # --compile not asked for

    assert [r["rank"] for r in optim] == ["4", "16", "64"]
    for row in optim:
        for col in OPTIM_COLUMNS:
            assert _number(row, col) > 0, (row, col)

    assert not (ROOT / "benchmarks" / "results" / "gpu.md").exists() or \
        "smoke" not in (ROOT / "benchmarks" / "results" / "gpu.md").read_text()
