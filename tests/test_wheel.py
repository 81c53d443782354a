"""The wheel carries configs/ and the toy world's assets, and works outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, target folder it was installed into); built from a copy so the checkout gets no build/."""
    if _pip("--version", cwd=ROOT).returncode != 0:
        pytest.skip("pip is not available")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("difflora", "configs", "assets"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    if built.returncode != 0 and "setuptools" in built.stderr and "No module named" in built.stderr:
        pytest.skip("setuptools is not installed, so no wheel can be built offline")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("difflora-*.whl")
    target = tmp / "target"
    done = _pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return wheel, target


def test_wheel_holds_every_package_configs_and_assets(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "difflora").rglob("__init__.py")
                if "__pycache__" not in p.parts]
    assert all(f"{pkg}/__init__.py" in names for pkg in packages), packages
    for shipped in ("configs/dreambooth/toy.yaml", "configs/sweeps/toy.yaml", "assets/toy-sd/model_index.json",
                    "assets/toy-clip/config.json", "assets/concepts/checkered_star/concept.json"):
        assert f"difflora/_data/{shipped}" in names, shipped
    assert "difflora/py.typed" in names


def test_installed_wheel_runs_from_another_folder(installed, tmp_path):
    _, target = installed
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    helped = subprocess.run([sys.executable, "-m", "difflora", "demo", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=60)
    assert helped.returncode == 0 and "--output_dir" in helped.stdout, helped.stderr
    check = """
import sys
from pathlib import Path
import difflora
from difflora.config import parse_config
from difflora.demo import ROOT
from difflora.train.dreambooth_config import DreamBoothConfig
target = Path(sys.argv[1]).resolve()
assert Path(difflora.__file__).resolve().is_relative_to(target), difflora.__file__
assert ROOT.resolve() == target / "difflora" / "_data", ROOT
cfg = parse_config(DreamBoothConfig, ["--config", str(ROOT / "configs" / "dreambooth" / "toy.yaml")])
for path in (cfg.pretrained_model_name_or_path, cfg.instance_data_dir, cfg.clip_model):
    assert Path(path).resolve().is_relative_to(target) and Path(path).is_dir(), path
assert cfg.output_dir == "outputs/toy-dreambooth"  # outputs stay relative to the working folder
print("ok")
"""
    ran = subprocess.run([sys.executable, "-c", check, str(target)], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-2000:]
