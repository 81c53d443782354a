"""DreamBooth and its output folder: --overwrite keeps the user's files and ends the old run (its
checkpoints too); one trainer per folder; a killed run's leftovers are cleaned on the next start."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difflora.cli import main as cli_main
from difflora.output_dir import LOCK_NAME

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str]) -> None:
    cli_main(["dreambooth", *argv])


def _fails(argv: list[str], capsys, expect: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "Traceback" not in "\n".join(err)
    assert expect in err[-1], err[-1]
    return err[-1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_overwrite_keeps_user_files_and_removes_the_old_runs_checkpoints(db_args, tmp_path, capsys):
    out = tmp_path / "o"
    _run(db_args("o", "--checkpointing_steps", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    (out / "notes.txt").write_text("mine")
    (out / "refs").mkdir()
    (out / "refs" / "ref.png").write_bytes(b"mine")

    _run(db_args("o", "--max_train_steps", "2", "--overwrite"))  # a new run, no checkpoints of its own
    assert (out / "notes.txt").read_text() == "mine" and (out / "refs" / "ref.png").read_bytes() == b"mine"
    assert not list(out.glob("checkpoint-*"))  # the replaced run's: gone
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # So "latest" cannot continue the old run.
    _fails(db_args("o", "--max_train_steps", "6", "--resume_from_checkpoint", "latest"), capsys,
           "no checkpoint to resume from")


def test_users_readme_in_output_dir_is_refused_not_replaced(db_args, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "README.md").write_text("my project")
    _fails(db_args("o"), capsys, "'README.md', which difflora did not write")
    _fails(db_args("o", "--overwrite"), capsys, "'README.md', which difflora did not write")
    assert (out / "README.md").read_text() == "my project"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["README.md"]


def test_overwrite_from_inside_the_output_dir_removes_nothing_that_holds_the_cwd(db_args, tmp_path, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "o"
    _run(db_args("o"))
    monkeypatch.chdir(out / "samples")
    _fails(db_args("o", "--overwrite"), capsys, "holds the current directory")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples" / "step-4.png").is_file()


def test_output_dir_that_is_the_instance_folder_is_refused(db_args, concept_dir, capsys):
    argv = db_args()
    argv[argv.index("--output_dir") + 1] = str(concept_dir)
    before = sorted(p.name for p in concept_dir.iterdir())
    _fails(argv, capsys, "is the input folder")
    assert sorted(p.name for p in concept_dir.iterdir()) == before


def test_second_trainer_is_refused_and_a_killed_ones_lock_and_leftovers_are_taken_over(db_args, tmp_path, capsys):
    out = tmp_path / "o"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "train_dreambooth.py"),
                              *db_args("o", "--max_train_steps", "100000", "--checkpointing_steps", "1",
                                       "--checkpoints_total_limit", "1", "--num_validation_images", "0")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while not list(out.glob("checkpoint-*")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None and list(out.glob("checkpoint-*")), "the first trainer did not start"
        _fails(db_args("o", "--overwrite"), capsys, f"output_dir '{out}' is in use by process {first.pid};")
        assert first.poll() is None  # the first one was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_NAME).is_file()  # a killed process leaves its lock file behind
    orphan = out / f".pytorch_lora_weights.safetensors.tmp-{_dead_pid()}"
    orphan.write_bytes(b"half")
    _run(db_args("o", "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
                 "--num_validation_images", "0", "--overwrite"))
    assert not orphan.exists() and not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # none of the killed run's


def test_checkpoint_beyond_the_limit_and_temp_files_are_cleaned_on_the_next_start(db_args, tmp_path):
    """Killed between a checkpoint's rename and the pruning: one checkpoint too many, and a killed
    final save's temporary file; the next start removes both (even when it saves nothing itself)."""
    out = tmp_path / "o"
    common = ("--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    _run(db_args("o", *common))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-1")  # the unpruned one
    orphan = out / f".pytorch_lora_weights.safetensors.tmp-{_dead_pid()}"
    orphan.write_bytes(b"half")
    (out / ".checkpoint-4.tmp").mkdir()  # a half-written checkpoint
    _run(db_args("o", *common, "--resume_from_checkpoint", "latest"))  # one last step, no checkpoint saved
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not orphan.exists() and not (out / ".checkpoint-4.tmp").exists()
