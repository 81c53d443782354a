"""Prior preservation fills the class folder up to the count asked for and never writes over a file
it did not create, even one named like its own (class-00002.png)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

from PIL import Image

from difflora.train.prior import ensure_class_images


class _FakePipeline:
    """Stands in for the base model: one flat grey image per generator, counting the calls."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self, prompts, num_inference_steps, generator, height, width):
        self.made += len(prompts)
        return SimpleNamespace(images=[Image.new("RGB", (width, height), (128, 128, 128)) for _ in prompts])


def _user_image(path, colour) -> bytes:
    Image.new("RGB", (8, 8), colour).save(path)
    return path.read_bytes()


def test_user_files_named_like_ours_are_kept_and_the_count_is_reached(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    mine = {name: _user_image(folder / name, (255, 0, 0)) for name in ("class-00002.png", "class-00000.jpg")}
    (folder / "class-00001.txt").write_text("a caption of the user's")  # its stem is taken too
    (folder / "notes.txt").write_text("mine")
    pipe = _FakePipeline()
    made = ensure_class_images(folder, "a photo of star", 5, lambda: pipe, resolution=16, seed=0, batch_size=2)
    assert made == pipe.made == 3
    images = sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) == 5  # what was asked for
    assert images == ["class-00000.jpg", "class-00002.png", "class-00003.png", "class-00004.png", "class-00005.png"]
    for name, data in mine.items():
        assert (folder / name).read_bytes() == data
    assert (folder / "class-00001.txt").read_text() == "a caption of the user's"
    assert (folder / "notes.txt").read_text() == "mine"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_full_folder_is_reused_and_reruns_generate_nothing(tmp_path):
    folder = tmp_path / "class"
    pipe = _FakePipeline()
    assert ensure_class_images(folder, "x", 3, lambda: pipe, resolution=16, seed=0) == 3
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure_class_images(folder, "x", 3, lambda: pipe, resolution=16, seed=0) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_temporary_image_of_a_killed_generation_is_removed_and_not_counted(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    orphan = folder / f".class-00000.tmp-{proc.pid}.png"
    Image.new("RGB", (8, 8)).save(orphan)
    live = folder / f".class-00009.tmp-{os.getppid()}.png"  # another live process is writing it
    Image.new("RGB", (8, 8)).save(live)
    pipe = _FakePipeline()
    assert ensure_class_images(folder, "x", 2, lambda: pipe, resolution=16, seed=0) == 2
    assert not orphan.exists() and live.exists()
    assert sorted(p.name for p in folder.glob("class-*.png")) == ["class-00000.png", "class-00001.png"]
