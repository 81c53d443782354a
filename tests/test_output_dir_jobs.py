"""Every job applies the output-folder rule: a user's file with one of the job's names is refused (one
line, exit 2, before any model loads) and kept; an earlier run's files of the job's own are replaced."""

from __future__ import annotations

import pytest

from difflora.cli import main as cli


def _refused(args: list[str], capsys, expect: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and expect in lines[0], err
    return lines[0]


def test_sample_refuses_a_users_grid_and_reruns_over_its_own(tiny_sd, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "grid.png").write_bytes(b"the user's grid")
    args = ["sample", "--model", str(tmp_path / "no-model"), "--prompt", "a star", "--seeds", "0", "--steps", "1",
            "--out", str(out)]
    _refused(args, capsys, "'grid.png', which difflora did not write")  # before the (missing) model loads
    assert (out / "grid.png").read_bytes() == b"the user's grid"

    args[args.index("--model") + 1] = str(tiny_sd)
    (out / "grid.png").unlink()
    (out / "notes.txt").write_text("mine")
    cli(args)
    first = (out / "manifest.json").read_text()
    cli([*args, "--seeds", "1"])  # a rerun replaces the files of the earlier sampling
    assert (out / "manifest.json").read_text() != first and (out / "notes.txt").read_text() == "mine"


def test_eval_refuses_to_replace_a_users_markdown_beside_out(tmp_path, capsys):
    (tmp_path / "scores.md").write_text("# my notes")
    (tmp_path / "imgs").mkdir()
    _refused(["eval", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--clip-model", "none",
              "--out", str(tmp_path / "scores.json")], capsys, "'scores.md', which difflora did not write")
    assert (tmp_path / "scores.md").read_text() == "# my notes"
    _refused(["eval", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--clip-model", "none",
              "--out", str(tmp_path)], capsys, "is a folder")


def test_sample_regions_refuses_a_users_settings_file(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "settings.json").write_text("{\"mine\": true}")
    _refused(["sample-regions", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--output_dir", str(out)],
             capsys, "'settings.json', which difflora did not write")
    assert (out / "settings.json").read_text() == "{\"mine\": true}"


def test_make_tiny_model_overwrite_keeps_the_users_files(tmp_path, capsys):
    out = tmp_path / "m"
    cli(["make-tiny-model", str(out)])
    (out / "notes.txt").write_text("mine")
    _refused(["make-tiny-model", str(out)], capsys, "not empty")
    cli(["make-tiny-model", str(out), "--overwrite", "--seed", "1"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "model_index.json").is_file()
