"""Every value from a file or a flag is checked before work: one line, exit 2, no traceback.

Files: truncated, hostile (decompression bomb), 16/32-bit and float images, captions that are not
UTF-8, sample manifests with wrong types. Flags: NaN / inf floats, negative counts, sizes that are
not multiples of 8, devices this machine lacks, a LoRA scale that is not a number. Ctrl-C while a
command starts is "interrupted", exit 130.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflora.cli import main as cli_main
from difflora.config import parse_config
from difflora.data import find_images, load_image, load_image_set, read_image
from difflora.errors import UserError, exit_on_user_error
from difflora.sampling import SampleConfig
from difflora.train.dreambooth import DreamBoothConfig

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(err: str, prog: str, expect: str) -> str:
    """The last stderr line is the error (libraries may warn above it); no traceback anywhere."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and expect in last, err
    return last


def one_line_exit_2(fn, capsys, expect: str) -> str:
    """Run ``fn`` under the entry points' guard: exit 2 with one error line containing ``expect``."""
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(fn, prog="difflora test")
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    return _one_error_line(err, "difflora test", expect)


def cli_fails(argv: list[str], capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    return _one_error_line(err, f"difflora {argv[0]}", expect)


def _truncated_jpeg(path: Path) -> Path:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is intact: only decoding fails
    return path


# ---- images ---------------------------------------------------------------------------------------


def test_truncated_jpeg_is_skipped_with_a_warning(tmp_path, caplog):
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 90, 0, 0)).save(tmp_path / f"{i}.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    images = load_image_set(tmp_path, "p", 32)
    assert [p.name for p in images.paths] == ["0.png", "1.png"]
    assert "cut.jpg" in caplog.text and "skipping 1" in caplog.text


def test_folder_of_only_truncated_images_is_one_line_exit_2(tmp_path, capsys):
    _truncated_jpeg(tmp_path / "cut.jpg")
    err = one_line_exit_2(lambda: find_images(tmp_path), capsys, "has no readable image")
    assert "cut.jpg" in err


def test_decompression_bomb_is_skipped_and_alone_refused(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # error above 2000 pixels, warning above 1000
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")  # 4096 pixels
    one_line_exit_2(lambda: find_images(tmp_path), capsys, "too large to decode safely")
    Image.new("RGB", (40, 40), (0, 90, 0)).save(tmp_path / "big.png")  # 1600: decoded, with a warning
    assert find_images(tmp_path) == [tmp_path / "big.png"]
    assert "bomb.png" in caplog.text and "big.png" in caplog.text


@pytest.mark.parametrize("values, expect", [
    (np.full((8, 8), 0.5, np.float32), 128),  # float in [0, 1]
    (np.full((8, 8), 200.0, np.float32), 200),  # float in [0, 255]
    (np.full((8, 8), 30000, np.int32), 117),  # 32-bit integer holding 16-bit values
])
def test_float_and_32_bit_images_are_scaled_not_black(tmp_path, values, expect):
    Image.fromarray(values).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode in ("F", "I")
    px = np.asarray(load_image(tmp_path / "x.tif"))
    assert px.shape == (8, 8, 3) and abs(int(px.mean()) - expect) <= 1


def test_float_image_with_nan_and_inf_pixels(tmp_path):
    arr = np.full((4, 4), 0.25, np.float32)
    arr[0, 0], arr[0, 1] = np.nan, np.inf
    Image.fromarray(arr).save(tmp_path / "x.tif")
    px = np.asarray(read_image(tmp_path / "x.tif", "L"))
    assert px[0, 0] == 0 and px[0, 1] == 255 and px[1, 1] == 64


def test_sixteen_bit_mask_is_read_through_the_loader(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(masks / "0.png")  # half weight, 16-bit
    example = load_image_set(tmp_path, "p", 32, center_crop=True, mask_dir=masks).example(0, 0)
    assert abs(float(example.mask.mean()) - 0.5) < 0.01  # scaled, not clipped to 1 by an 8-bit conversion


# ---- text files -----------------------------------------------------------------------------------


def test_caption_that_is_not_utf8_is_one_line_exit_2(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "0.png")
    (tmp_path / "0.txt").write_bytes("une photo de sks chien \xe9t\xe9".encode("latin-1"))
    err = one_line_exit_2(lambda: load_image_set(tmp_path, "p", 32, captions=True), capsys, "not UTF-8")
    assert "0.txt" in err


def test_caption_byte_order_mark_is_not_part_of_the_prompt(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "0.png")
    (tmp_path / "0.txt").write_bytes("\ufeffa photo of sks dog".encode())
    assert load_image_set(tmp_path, "p", 32, captions=True).prompts == ["a photo of sks dog"]


def test_config_file_that_is_not_utf8(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"prompt: caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8"):
        parse_config(SampleConfig, ["--config", str(tmp_path / "c.yaml")])


# ---- flags and config values ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_non_finite_float_flags_are_refused(value):
    with pytest.raises(UserError, match="option 'guidance' must be a finite number"):
        parse_config(SampleConfig, ["--guidance", value])


def test_non_finite_float_in_yaml_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: .nan\n")
    with pytest.raises(UserError, match="learning_rate"):
        parse_config(DreamBoothConfig, ["--config", str(tmp_path / "c.yaml"), "--pretrained_model_name_or_path",
                                        "m", "--instance_data_dir", "d", "--instance_prompt", "p"])


@pytest.mark.parametrize("flag, value, expect", [
    ("--lr_warmup_steps", "-5", "--lr_warmup_steps must be >= 0"),
    ("--adam_beta2", "1.0", "--adam_beta2 must be >= 0 and < 1"),
    ("--adam_epsilon", "0", "--adam_epsilon must be > 0"),
    ("--snr_gamma", "-1", "--snr_gamma must be > 0"),
    ("--lora_alpha", "0", "--lora_alpha must be > 0"),
    ("--noise_offset", "-0.1", "--noise_offset must be >= 0"),
    ("--num_class_images", "-1", "--num_class_images must be >= 0"),
    ("--validation_inference_steps", "0", "--validation_inference_steps must be > 0"),
    ("--seed", "-1", "--seed must be >= 0"),
])
def test_out_of_range_training_options_are_refused(flag, value, expect):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
    with pytest.raises(UserError, match=expect):
        parse_config(DreamBoothConfig, [*base, flag, value])


def test_edlora_shares_the_training_bounds():
    from difflora.mix_of_show.edlora import EDLoRAConfig

    with pytest.raises(UserError, match="--lr_warmup_steps must be >= 0"):
        parse_config(EDLoRAConfig, ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                    "--lr_warmup_steps", "-1"])


@pytest.mark.parametrize("argv, expect", [
    (["--height", "30"], "--height must be a positive multiple of 8, got 30"),
    (["--width", "0"], "--width must be a positive multiple of 8"),
])
def test_sample_size_must_be_a_multiple_of_8(argv, expect):
    with pytest.raises(UserError, match=expect):
        parse_config(SampleConfig, ["--model", "m", "--prompt", "a", *argv])


def test_lora_scale_that_is_not_a_number_names_the_scale(tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    out = str(tmp_path / "out")
    err = cli_fails(["sample", "--model", str(tmp_path), "--prompt", "a", "--lora", f"{lora}:abc", "--out", out],
                    capsys, "the scale 'abc' is not a number")
    assert "does not exist" not in err
    cli_fails(["sample", "--model", str(tmp_path), "--prompt", "a", "--lora", f"{lora}:nan", "--out", out],
              capsys, "finite")


@pytest.mark.parametrize("command, extra", [
    ("sample", ["--model", "m", "--prompt", "a"]),
    ("fuse", ["--concepts", "c.yaml", "--pretrained_model_name_or_path", "m", "--output_dir", "o"]),
    ("sample-regions", ["--model", "m", "--output_dir", "o", "--prompt", "a"]),
    ("eval", ["--images", "i", "--clip_model", "c"]),
    ("edlora", ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"]),
])
def test_unavailable_device_is_refused_before_any_work(command, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli_fails([command, *extra, "--device", "cuda:99"], capsys, "cuda:99")
    cli_fails([command, *extra, "--device", "tpu"], capsys, "is not a torch device")
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---- sample manifests -----------------------------------------------------------------------------


@pytest.mark.parametrize("settings, expect", [
    ({"seeds": "abc"}, "option 'seeds' expects an integer"),
    ({"steps": [1, 2]}, "option 'steps' expects an integer"),
    ({"guidance": "nan"}, "option 'guidance' must be a finite number"),
    ({"dtype": "float64"}, "option 'dtype' must be one of"),
    ({"height": 30}, "--height must be a positive multiple of 8"),
    ({"model": {"a": 1}}, "option 'model' expects a string"),
    ({"colour": "red"}, "unknown option 'colour'"),
])
def test_manifest_with_wrong_types_is_one_line_exit_2(settings, expect, tmp_path, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"settings": {"model": "m", "prompt": ["a"], **settings}, "images": []}))
    err = cli_fails(["sample", "--manifest", str(manifest)], capsys, expect)
    assert str(manifest) in err


def test_manifest_that_is_not_a_mapping(tmp_path, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text("[1, 2]")
    cli_fails(["sample", "--manifest", str(manifest)], capsys, "not a difflora sample manifest")


# ---- interrupts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "difflora", "sample", "--model", "m", "--prompt", "a"],
    [sys.executable, "train_dreambooth.py", "--pretrained_model_name_or_path", "m"],
    [sys.executable, "mix_of_show/sample_regions.py", "--model", "m", "--prompt", "a", "--output_dir", "o"],
])
def test_ctrl_c_during_start_up_is_one_line_exit_130(command):
    # A shell's background job (``pytest ... &``) starts with SIGINT ignored and its children inherit
    # that, as Unix wants; the child here gets the default disposition a terminal's Ctrl-C meets.
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.4)  # the interpreter is up; the command is still importing torch and diffusers
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(": interrupted"), err
