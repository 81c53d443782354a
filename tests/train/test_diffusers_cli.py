"""diffusers' DreamBooth LoRA command lines run unchanged (README's and diffusers' READMEs).

The command lines below are those of diffusers' examples/dreambooth/README.md (LoRA section) and
README_sdxl.md. Each runs through ``difflora dreambooth`` with only what this offline CPU test
must change: the hub model id becomes the tiny model folder (and the fp16-fix VAE id its VAE),
the photo folder the shipped concept, resolution 32 px, max_train_steps 2, one 2-step validation
image, mixed precision off (fp16 needs a GPU). Flags whose package or network is missing here
(``--report_to wandb``, ``--use_8bit_adam``, ``--push_to_hub``) are first checked to fail with one
line, then the run goes on without the package (report_to tensorboard) or ends with the documented
exit code 3 for the failed push, its trained files kept.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from difflora.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]

DIFFUSERS_LORA = """accelerate launch train_dreambooth_lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --checkpointing_steps=100 \\
  --learning_rate=1e-4 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=50 \\
  --seed="0" \\
  --push_to_hub"""

DIFFUSERS_SDXL = """accelerate launch train_dreambooth_lora_sdxl.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --pretrained_vae_model_name_or_path=$VAE_PATH \\
  --output_dir=$OUTPUT_DIR \\
  --mixed_precision="fp16" \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=1024 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --learning_rate=1e-4 \\
  --use_8bit_adam \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=25 \\
  --seed="0" \\
  --push_to_hub"""


def readme_command() -> str:
    """The diffusers-style command line of difflora's README (the block after 'exactly as with')."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("# or exactly as with diffusers' script:"):]
    return block[block.index("\n") + 1:block.index("```")]


def argv_of(command: str, variables: dict[str, str]) -> list[str]:
    """The flags of a shell command line (continuations joined, $VARS filled in), script name dropped."""
    command = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], command.replace("\\\n", " "))
    tokens = shlex.split(command)
    start = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
    return tokens[start + 1:]


def with_values(argv: list[str], **values: str) -> list[str]:
    """``argv`` with the given flags' values replaced (both ``--k=v`` and ``--k v`` forms), others kept."""
    out, i = [], 0
    while i < len(argv):
        key, eq, _ = argv[i][2:].partition("=")
        if key in values:
            out.append(f"--{key}={values[key]}")
            i += 1 if eq else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def without(argv: list[str], *flags: str) -> list[str]:
    return [a for a in argv if a.partition("=")[0].removeprefix("--") not in flags]


def run(argv: list[str]) -> int:
    try:
        cli(["dreambooth", *argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


# Only what an offline CPU test must change (module docstring): small, fast, no GPU.
FAST = dict(resolution="32", max_train_steps="2", mixed_precision="no")
SMALL_GRIDS = ["--num_validation_images", "1", "--validation_inference_steps", "2"]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1, err
    return err[0]


def test_readme_command_line(tiny_sd, concept_dir, tmp_path, capsys):
    argv = argv_of(readme_command(), {})
    argv = with_values(argv, pretrained_model_name_or_path=str(tiny_sd), instance_data_dir=str(concept_dir),
                       output_dir=str(tmp_path / "out"), **FAST)
    assert run([*argv, *SMALL_GRIDS]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("which", ["lora", "sdxl"])
def test_diffusers_readme_command_lines(which, tiny_sd, tiny_sdxl, concept_dir, tmp_path, capsys):
    model = tiny_sd if which == "lora" else tiny_sdxl
    out = tmp_path / "out"
    argv = argv_of(DIFFUSERS_LORA if which == "lora" else DIFFUSERS_SDXL,
                   {"MODEL_NAME": str(model), "INSTANCE_DIR": str(concept_dir), "OUTPUT_DIR": str(out),
                    "VAE_PATH": str(tiny_sdxl / "vae")})
    argv = with_values(argv, **FAST)
    if importlib.util.find_spec("wandb") is None:  # refused in one line, before any model loads
        assert run([*argv, *SMALL_GRIDS]) == 2
        assert "pip install wandb" in _one_error_line(capsys)
        assert not out.exists()
        argv = with_values(argv, report_to="tensorboard")
    if "--use_8bit_adam" in argv and importlib.util.find_spec("bitsandbytes") is None:
        assert run([*argv, *SMALL_GRIDS]) == 2
        assert "pip install bitsandbytes" in _one_error_line(capsys)
        argv = without(argv, "use_8bit_adam")
    # Offline here: --push_to_hub fails at the very end with exit 3, every trained file kept.
    code = run([*argv, *SMALL_GRIDS])
    message = _one_error_line(capsys)
    assert code == 3 and "pushing to the hub" in message and str(out) in message
    for name in ("pytorch_lora_weights.safetensors", "README.md", "samples/step-2.png"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_every_diffusers_flag_is_accepted():
    """The flags of diffusers' two scripts (the argparse lists of train_dreambooth_lora.py and
    train_dreambooth_lora_sdxl.py), each with a value of its type, parse with the same name."""
    from difflora.config import _fields
    from difflora.train.dreambooth_config import DreamBoothConfig

    flags = """pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant tokenizer_name
    dataset_name dataset_config_name instance_data_dir cache_dir image_column caption_column repeats class_data_dir
    instance_prompt class_prompt validation_prompt num_validation_images validation_epochs do_edm_style_training
    with_prior_preservation prior_loss_weight num_class_images output_dir output_kohya_format seed resolution
    center_crop random_flip train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps
    checkpointing_steps checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps
    gradient_checkpointing learning_rate text_encoder_lr scale_lr lr_scheduler snr_gamma lr_warmup_steps
    lr_num_cycles lr_power dataloader_num_workers optimizer use_8bit_adam adam_beta1 adam_beta2 prodigy_beta3
    prodigy_decouple adam_weight_decay adam_weight_decay_text_encoder adam_epsilon prodigy_use_bias_correction
    prodigy_safeguard_warmup max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to
    mixed_precision prior_generation_precision local_rank enable_xformers_memory_efficient_attention
    pre_compute_text_embeddings tokenizer_max_length text_encoder_use_attention_mask validation_images
    class_labels_conditioning rank lora_dropout use_dora image_interpolation_mode crops_coords_top_left_h
    crops_coords_top_left_w set_grads_to_none""".split()
    fields = _fields(DreamBoothConfig)
    missing = [f for f in flags if f not in fields]
    assert not missing, missing


def test_diffusers_defaults():
    """Where a flag is diffusers' (train_dreambooth_lora.py), so is its default; the deliberate
    differences are the table of docs/diffusers_flags.md."""
    import dataclasses

    from difflora.train.dreambooth_config import DreamBoothConfig

    defaults = {f.name: f.default for f in dataclasses.fields(DreamBoothConfig)}
    expected = dict(learning_rate=5e-4, lr_warmup_steps=500, report_to="tensorboard", validation_epochs=50,
                    num_validation_images=4, train_batch_size=4, sample_batch_size=4, num_class_images=100,
                    resolution=512, checkpointing_steps=500, num_train_epochs=1, gradient_accumulation_steps=1,
                    lr_scheduler="constant", lr_num_cycles=1, lr_power=1.0, adam_beta1=0.9, adam_beta2=0.999,
                    adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0, logging_dir="logs",
                    output_dir="lora-dreambooth-model", rank=4, lora_dropout=0.0, prior_loss_weight=1.0,
                    local_rank=-1, dataloader_num_workers=0, image_interpolation_mode="lanczos")
    assert {k: defaults[k] for k in expected} == expected
    table = (ROOT / "docs" / "diffusers_flags.md").read_text()
    for name in ("optimizer", "seed", "text_encoder_lr", "resolution", "adam_weight_decay"):
        assert f"`--{name}`" in table, name


def test_optimizer_choices_match_the_factory():
    from difflora.optim import OPTIMIZER_NAMES
    from difflora.train.options import OPTIMIZER_CHOICES

    assert set(OPTIMIZER_CHOICES) == {*OPTIMIZER_NAMES, "prodigy"}
