"""The output folder: never lose what a user already has.

A folder that holds a finished run (its LoRA file) is refused unless the user says
``--overwrite`` (replace our outputs, keep every other file) or resumes it to more steps.
"""

from __future__ import annotations

import os
from pathlib import Path

from difflora.errors import UserError
from difflora.lora_io import LORA_WEIGHT_NAME


def prepare_output_dir(output_dir: str | Path, overwrite: bool, resuming: bool,
                       result_name: str = LORA_WEIGHT_NAME) -> Path:
    """Create ``output_dir`` or check that writing into it loses nothing.

    ``result_name`` is the file that marks a finished run (the LoRA file, or an ED-LoRA concept file).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file; choose a folder path")
    if (out / result_name).exists() and not (overwrite or resuming):
        raise UserError(f"output_dir '{out}' already holds a finished run; pass --overwrite to replace it, "
                        "--resume_from_checkpoint latest to continue it, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file so a killed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save_image(image, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    image.save(tmp)
    os.replace(tmp, path)
