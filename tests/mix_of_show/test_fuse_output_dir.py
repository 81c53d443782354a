"""fuse and its output folder: `--output_dir ..` / `.` with --overwrite replace only the fused model and
keep every file of the user's; what cannot be done safely is refused before the fusion work."""

from __future__ import annotations

import json

import pytest

from difflora.errors import UserError
from difflora.mix_of_show.fuse import CONCEPTS_FILE, REPORT_FILE
from difflora.mix_of_show.fuse import main as fuse_main


def _fuse(base, yaml_path, out, *extra):
    fuse_main(["--concepts", str(yaml_path), "--pretrained_model_name_or_path", str(base),
               "--output_dir", str(out), "--sample_steps", "1", "--prompt_templates", "{}", *extra])


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _kept(before, folder):
    return all((folder / name).is_file() and (folder / name).read_bytes() == data for name, data in before.items())


def test_dotdot_and_dot_with_overwrite_keep_the_users_files(two_concepts, tmp_path, monkeypatch):
    base, yaml_path, _ = two_concepts
    project = tmp_path / "project"
    (project / "work").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "work" / "draft.txt").write_text("mine too")
    (project / "data").mkdir()
    (project / "data" / "a.bin").write_bytes(b"\x00mine")
    before = _files(project)
    monkeypatch.chdir(project / "work")

    with pytest.raises(UserError, match="not empty"):  # the user's folder: only with --overwrite
        _fuse(base, yaml_path, "..")
    _fuse(base, yaml_path, "..", "--overwrite")
    assert _kept(before, project)
    assert {p.name for p in project.iterdir() if not p.name.startswith(".")} == {
        "notes.txt", "work", "data", "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler",
        CONCEPTS_FILE, REPORT_FILE}
    first = json.loads((project / REPORT_FILE).read_text())["summary"]

    _fuse(base, yaml_path, "..", "--overwrite", "--method", "average")  # replaces the fused model only
    assert json.loads((project / REPORT_FILE).read_text())["summary"]["method"] == "average" != first["method"]
    monkeypatch.chdir(project)
    _fuse(base, yaml_path, ".", "--overwrite")  # '.' works too
    assert _kept(before, project)
    assert (project / "unet").is_dir() and not [p for p in project.iterdir() if ".tmp" in p.name]

    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(project)  # a complete model


def test_overwrite_that_would_remove_the_current_directory_is_refused_before_work(two_concepts, tmp_path,
                                                                                monkeypatch):
    base, yaml_path, _ = two_concepts
    out = tmp_path / "fused"
    _fuse(base, yaml_path, out)
    monkeypatch.chdir(out / "unet")
    report = (out / REPORT_FILE).read_bytes()
    with pytest.raises(UserError, match="holds the current directory"):
        _fuse(base, yaml_path, "..", "--overwrite")
    assert (out / REPORT_FILE).read_bytes() == report and (out / "unet").is_dir()


def test_a_users_folder_with_a_component_name_is_refused_not_replaced(two_concepts, tmp_path):
    base, yaml_path, _ = two_concepts
    out = tmp_path / "project"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match="'vae', which difflora did not write"):
        _fuse(base, yaml_path, out, "--overwrite")
    assert (out / "vae" / "mine.txt").read_text() == "mine"


def test_the_base_model_folder_is_never_an_output(two_concepts):
    base, yaml_path, _ = two_concepts
    index = (base / "model_index.json").read_bytes()
    with pytest.raises(UserError, match="is the input folder"):
        _fuse(base, yaml_path, base, "--overwrite")
    assert (base / "model_index.json").read_bytes() == index and (base / "unet").is_dir()
