"""The output-folder rule: --overwrite removes only difflora's entries, never the user's, the current
directory or an input; unusable folders are refused up front; one trainer per folder; orphans of a
killed run are cleaned on the next start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from difflora.errors import UserError
from difflora.output_dir import (
    CHECKPOINT_PATTERN,
    LOCK_NAME,
    RECORD_NAME,
    Outputs,
    output_job,
    prepare_output_dir,
    release_output_dir,
)

JOB = Outputs("job", ("result.bin", "README.md", "samples", "metrics.json"), patterns=(CHECKPOINT_PATTERN,),
              marker="result.bin")
ROOT = Path(__file__).resolve().parents[1]


def _finished_run(out: Path, checkpoints: tuple[int, ...] = ()) -> None:
    """A folder as a finished run of JOB leaves it: recorded outputs plus checkpoints."""
    prepare_output_dir(out, JOB, overwrite=False)
    (out / "result.bin").write_bytes(b"old")
    (out / "README.md").write_text("model card")
    (out / "samples").mkdir()
    (out / "samples" / "step-4.png").write_bytes(b"png")
    for step in checkpoints:
        (out / f"checkpoint-{step}").mkdir()
        (out / f"checkpoint-{step}" / "state.json").write_text(json.dumps({"step": step}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- --overwrite keeps what is not difflora's ---------------------------------------------------


def test_overwrite_removes_our_outputs_and_checkpoints_and_keeps_the_users(tmp_path):
    out = tmp_path / "out"
    _finished_run(out, checkpoints=(2, 4))
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "a.png").write_bytes(b"mine")
    prepare_output_dir(out, JOB, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name != RECORD_NAME) == ["data", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "a.png").read_bytes() == b"mine"


def test_finished_run_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    _finished_run(out)
    with pytest.raises(UserError, match="already holds a finished run; pass --overwrite"):
        prepare_output_dir(out, JOB, overwrite=False)
    assert (out / "result.bin").read_bytes() == b"old"


def test_checkpoints_of_an_unfinished_run_need_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    _finished_run(out, checkpoints=(2,))
    (out / "result.bin").unlink()
    with pytest.raises(UserError, match="'checkpoint-2' of an unfinished run"):
        prepare_output_dir(out, JOB, overwrite=False)
    prepare_output_dir(out, JOB, overwrite=False, resuming=True)  # continuing it is fine
    assert (out / "checkpoint-2").is_dir()


def test_a_users_file_with_one_of_our_names_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("the user's readme")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="'README.md', which difflora did not write"):
            prepare_output_dir(out, JOB, overwrite=overwrite)
    assert (out / "README.md").read_text() == "the user's readme"


def test_a_users_file_beside_a_recorded_run_is_kept_even_with_our_pattern_elsewhere(tmp_path):
    out = tmp_path / "out"
    _finished_run(out)
    (out / "checkpoint-notes.txt").write_text("mine")  # not checkpoint-N
    prepare_output_dir(out, JOB, overwrite=True)
    assert (out / "checkpoint-notes.txt").read_text() == "mine"


def test_overwrite_never_removes_the_current_directory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _finished_run(out)
    monkeypatch.chdir(out / "samples")
    with pytest.raises(UserError, match="holds the current directory"):
        prepare_output_dir(out, JOB, overwrite=True)
    assert (out / "result.bin").read_bytes() == b"old"  # refused before anything was removed
    assert (out / "samples" / "step-4.png").is_file()


def test_output_dir_dot_and_dotdot_remove_only_our_entries(tmp_path, monkeypatch):
    out = tmp_path / "project"
    _finished_run(out)
    (out / "notes.txt").write_text("mine")
    (out / "work").mkdir()
    monkeypatch.chdir(out / "work")
    prepare_output_dir("..", JOB, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "work").is_dir()
    assert not (out / "result.bin").exists()
    monkeypatch.chdir(out)
    (out / "result.bin").write_bytes(b"new")
    prepare_output_dir(".", JOB, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "result.bin").exists()


def test_overwrite_never_removes_an_input(tmp_path):
    out = tmp_path / "out"
    _finished_run(out)
    with pytest.raises(UserError, match="is or holds the input"):
        prepare_output_dir(out, JOB, overwrite=True, inputs=[out / "samples" / "step-4.png"])
    assert (out / "samples" / "step-4.png").is_file() and (out / "result.bin").is_file()


def test_output_dir_that_is_an_input_folder_is_refused(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    (data / "a.png").write_bytes(b"mine")
    with pytest.raises(UserError, match="is the input folder"):
        prepare_output_dir(data, JOB, overwrite=True, inputs=[data])
    assert [p.name for p in data.iterdir()] == ["a.png"]
    prepare_output_dir(data / "out", JOB, overwrite=False, inputs=[data])  # a folder inside it is fine


def test_symlinked_entry_is_unlinked_not_followed(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    _finished_run(out)
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"mine")
    import shutil

    shutil.rmtree(out / "samples")
    (out / "samples").symlink_to(elsewhere)
    prepare_output_dir(out, JOB, overwrite=True)
    assert not (out / "samples").exists() and (elsewhere / "keep.png").read_bytes() == b"mine"


# ---- unusable folders are refused before any work -----------------------------------------------


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare_output_dir(tmp_path / "f", JOB, overwrite=True)
    with pytest.raises(UserError, match="cannot create output_dir"):
        prepare_output_dir(tmp_path / "f" / "out", JOB, overwrite=False)
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot write into output_dir"):
            prepare_output_dir(out, JOB, overwrite=False)
    finally:
        out.chmod(0o755)


def test_unwritable_output_dir_refused(tmp_path, monkeypatch):
    """The write probe failing (read-only mount, no permission) is one line, whoever runs it."""
    real_open = os.open

    def deny(path, *args, **kwargs):
        if ".difflora-probe" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(UserError, match=r"cannot write into output_dir '.*' \(read-only\)"):
        prepare_output_dir(tmp_path / "out", JOB, overwrite=False)


def test_full_disk_refused(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="MiB free on the disk"):
        prepare_output_dir(tmp_path / "out", JOB, overwrite=False)


def test_a_failed_job_leaves_no_folder_it_created(tmp_path):
    @output_job
    def job(out: Path) -> None:
        prepare_output_dir(out, JOB, overwrite=False, lock=True)
        raise UserError("bad input found after the folder was prepared")

    with pytest.raises(UserError):
        job(tmp_path / "new" / "out")
    assert not (tmp_path / "new" / "out").exists()


# ---- one trainer per folder ---------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    from difflora.output_dir import Outputs, prepare_output_dir
    prepare_output_dir(sys.argv[1], Outputs("job", ()), overwrite=False, lock=True)
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_trainer_on_a_folder_is_refused_and_lock_freed_when_first_dies(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"output_dir '{out}' is in use by process {holder.pid};"):
            prepare_output_dir(out, JOB, overwrite=True, lock=True)
    finally:
        holder.kill()  # like kill -9: no clean-up runs in the holder
        holder.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind by the killed process
    prepare_output_dir(out, JOB, overwrite=True, lock=True)  # stale: taken over
    try:
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        release_output_dir(out)
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{_dead_pid()}\n")
    prepare_output_dir(out, JOB, overwrite=False, lock=True)
    try:
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        release_output_dir(out)


@pytest.mark.parametrize("error", [UserError, KeyboardInterrupt, RuntimeError])
def test_lock_released_when_the_job_raises(tmp_path, error):
    out = tmp_path / "out"

    @output_job
    def job() -> None:
        prepare_output_dir(out, JOB, overwrite=False, lock=True)
        (out / "metrics.json").write_text("{}")
        assert (out / LOCK_NAME).is_file()
        raise error("stop")

    with pytest.raises(error):
        job()
    assert not (out / LOCK_NAME).exists()
    job2 = output_job(lambda: prepare_output_dir(out, JOB, overwrite=False, lock=True))
    job2()  # the folder is free again
    assert not (out / LOCK_NAME).exists()


# ---- orphans of a killed run --------------------------------------------------------------------


def test_orphans_of_a_killed_run_are_cleaned_on_the_next_start(tmp_path):
    out = tmp_path / "out"
    _finished_run(out, checkpoints=(2, 4, 6))
    dead, alive = _dead_pid(), os.getppid()
    orphans = [f".result.bin.tmp-{dead}", f".metrics.tmp-{dead}.json", ".checkpoint-8.tmp", ".metrics.json.tmp"]
    for name in orphans:
        (out / name).write_bytes(b"half")
    (out / f".result.bin.tmp-{alive}").write_bytes(b"being written")  # a live process's: kept
    (out / ".notes.tmp").write_text("mine")  # the user's hidden file: kept
    (out / f".notes.txt.tmp-{dead}").write_text("mine")  # not a name of ours: kept
    prepare_output_dir(out, JOB, overwrite=False, resuming=True, lock=True, checkpoints_total_limit=2)
    release_output_dir(out)
    names = {p.name for p in out.iterdir()}
    assert not names & set(orphans)
    assert {f".result.bin.tmp-{alive}", ".notes.tmp", f".notes.txt.tmp-{dead}"} <= names
    assert sorted(n for n in names if n.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-6"]


def test_pruning_keeps_the_checkpoint_being_resumed(tmp_path):
    out = tmp_path / "out"
    _finished_run(out, checkpoints=(2, 4, 6))
    prepare_output_dir(out, JOB, overwrite=False, resuming=True, lock=True, checkpoints_total_limit=1,
                       keep=out / "checkpoint-2")
    release_output_dir(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]


def test_half_replaced_checkpoint_is_restored(tmp_path):
    """Killed between moving checkpoint-4 aside and moving its replacement in: the old one comes back."""
    out = tmp_path / "out"
    _finished_run(out, checkpoints=(4,))
    os.replace(out / "checkpoint-4", out / ".checkpoint-4.old")
    (out / ".checkpoint-4.tmp").mkdir()
    prepare_output_dir(out, JOB, overwrite=False, resuming=True, lock=True)
    release_output_dir(out)
    assert (out / "checkpoint-4" / "state.json").is_file()
    assert not (out / ".checkpoint-4.old").exists() and not (out / ".checkpoint-4.tmp").exists()


def test_temp_files_are_only_cleaned_for_dead_processes_without_the_lock(tmp_path):
    out = tmp_path / "out"
    _finished_run(out)
    dead = _dead_pid()
    (out / f".result.bin.tmp-{dead}").write_bytes(b"half")
    (out / ".checkpoint-8.tmp").mkdir()  # no pid: only a lock holder may remove it
    prepare_output_dir(out, JOB, overwrite=True)
    assert not (out / f".result.bin.tmp-{dead}").exists() and (out / ".checkpoint-8.tmp").is_dir()


def test_lock_holder_sees_a_consistent_file(tmp_path):
    """The lock file names its holder while held (what the refusal message reports)."""
    out = tmp_path / "out"
    prepare_output_dir(out, JOB, overwrite=False, lock=True)
    try:
        deadline = time.time() + 5
        while not (out / LOCK_NAME).read_text().strip() and time.time() < deadline:
            time.sleep(0.05)
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match="is in use by process"):
            prepare_output_dir(out, JOB, overwrite=False, lock=True)  # not re-entrant within a process
    finally:
        release_output_dir(out)


def test_folder_made_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    """Two DDP ranks create output_dir at the same moment: the one whose mkdir loses the race uses
    the folder the other made (it was once refused as 'part of the path is a file')."""
    from pathlib import Path

    from difflora import output_dir as od

    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)  # the other rank wins the race ...
        raise FileExistsError(self)  # ... and this one's mkdir finds the folder there

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    od._create(out, "output_dir")
    monkeypatch.undo()
    assert out.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        od._create(blocker, "output_dir")
