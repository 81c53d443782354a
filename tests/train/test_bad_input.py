"""Every user mistake: one line naming the problem and the fix, exit 2, nothing lost."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from difflora.cli import main as cli_main


def _fails(argv, capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(["dreambooth", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    last = err[-1]
    assert last.startswith("difflora dreambooth: error:"), last
    assert "Traceback" not in "\n".join(err)
    assert expect in last, last
    return last


def _replace(argv: list[str], flag: str, value: str | None) -> list[str]:
    out = list(argv)
    i = out.index(flag)
    if value is None:
        del out[i:i + 2]
    else:
        out[i + 1] = value
    return out


def test_missing_instance_folder(db_args, capsys, tmp_path):
    _fails(_replace(db_args(), "--instance_data_dir", str(tmp_path / "nope")), capsys, "does not exist")


def test_empty_instance_folder(db_args, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(_replace(db_args(), "--instance_data_dir", str(tmp_path / "empty")), capsys, "is empty")


def test_folder_of_only_corrupt_images(db_args, capsys, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    _fails(_replace(db_args(), "--instance_data_dir", str(bad)), capsys, "has no readable image")


def test_corrupt_image_among_good_ones_is_skipped_with_its_name(db_args, concept_dir, caplog):
    (concept_dir / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    from difflora.data import find_images

    paths = find_images(concept_dir)
    assert "broken.jpg" not in [p.name for p in paths] and len(paths) == 5
    assert "broken.jpg" in caplog.text


def test_missing_instance_prompt(db_args, capsys):
    _fails(_replace(db_args(), "--instance_prompt", None), capsys, "missing --instance_prompt")


def test_unknown_key_lists_valid_keys(db_args, capsys):
    last = _fails(db_args() + ["--learning_rat", "1e-4"], capsys, "unknown option 'learning_rat'")
    assert "learning_rate" in last


def test_wrong_type(db_args, capsys):
    _fails(_replace(db_args(), "--max_train_steps", "many"), capsys, "expects an integer")


def test_rank_must_be_positive(db_args, capsys):
    _fails(db_args() + ["--rank", "0"], capsys, "--rank must be > 0")


def test_resolution_multiple_of_8(db_args, capsys):
    _fails(_replace(db_args(), "--resolution", "30"), capsys, "multiple of 8")


def test_model_folder_missing_component(db_args, tiny_sd, capsys, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_sd, broken, ignore=shutil.ignore_patterns("clip", "dino"))
    shutil.rmtree(broken / "vae")
    _fails(_replace(db_args(), "--pretrained_model_name_or_path", str(broken)), capsys, "no 'vae' component")


def test_finished_run_is_not_overwritten(db_args, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    _fails(db_args(), capsys, "already holds a finished run; pass --overwrite")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"precious"
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_path_that_does_not_exist(db_args, capsys, tmp_path):
    (tmp_path / "out").mkdir()
    _fails(db_args() + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-9")], capsys, "does not exist")


def test_resume_latest_of_a_finished_run_without_checkpoints(db_args, capsys, tmp_path):
    cli_main(["dreambooth", *db_args("f", "--max_train_steps", "2")])  # checkpointing_steps 100: none kept
    capsys.readouterr()
    weights = (tmp_path / "f" / "pytorch_lora_weights.safetensors").read_bytes()
    last = _fails(db_args("f", "--max_train_steps", "2", "--resume_from_checkpoint", "latest"), capsys,
                  "no checkpoint to resume from; pass --overwrite")
    assert "--resume_from_checkpoint" not in last  # the fix is not the flag the user just passed
    assert (tmp_path / "f" / "pytorch_lora_weights.safetensors").read_bytes() == weights


def test_resume_from_a_checkpoint_path_into_a_new_folder(db_args, capsys, tmp_path):
    from safetensors.torch import load_file

    cli_main(["dreambooth", *db_args("a", "--max_train_steps", "4", "--checkpointing_steps", "2",
                                     "--learning_rate", "1e-2")])
    cli_main(["dreambooth", *db_args("b", "--max_train_steps", "4", "--checkpointing_steps", "2",
                                     "--learning_rate", "1e-2",
                                     "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2"))])
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_another_model(db_args, capsys, tmp_path):
    cli_main(["dreambooth", *db_args("o", "--max_train_steps", "3", "--checkpointing_steps", "2")])
    capsys.readouterr()
    _fails(db_args("o", "--max_train_steps", "4", "--checkpointing_steps", "2", "--rank", "8",
                   "--resume_from_checkpoint", "latest"), capsys, "was made with rank=4")


def test_nan_loss_stops_and_names_the_step(db_args, capsys, tmp_path):
    last = _fails(db_args("n", "--optimizer", "sgd", "--learning_rate", "1e30", "--max_grad_norm", "0",
                          "--max_train_steps", "6", "--checkpointing_steps", "1"), capsys, "the loss became")
    assert "at step" in last and "checkpoint-" in last
    assert not (tmp_path / "n" / "pytorch_lora_weights.safetensors").exists()


def test_entry_script_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train_dreambooth.py", "--pretrained_model_name_or_path", "x",
                           "--instance_data_dir", str(tmp_path / "missing"), "--instance_prompt", "a sks dog"],
                          capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("train_dreambooth.py: error:")


def test_unknown_lr_scheduler(db_args, capsys):
    _fails(db_args() + ["--lr_scheduler", "cosinus"], capsys, "unknown --lr_scheduler 'cosinus'; valid:")


def test_unknown_optimizer(db_args, capsys):
    _fails(db_args() + ["--optimizer", "lion"], capsys, "unknown --optimizer 'lion'; valid:")
