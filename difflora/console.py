"""What the console shows: difflora's own messages and progress, not the libraries' chatter.

:func:`setup` is called by every entry point before a job runs. By default the libraries'
logging, Python warnings and their "Loading weights" progress bars are silenced (they name
internals a user cannot act on, and bury the lines that matter); ``--verbose`` shows them all.
difflora's own ``logging`` messages (the ``difflora`` logger, INFO and up) always reach stderr,
printed through tqdm so they never tear a progress bar. :func:`run_summary` is the start-of-run
summary the trainer logs: what is trained, on what, for how long, and where it goes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft", "torch", "torchmetrics",
             "PIL", "matplotlib", "urllib3", "filelock", "httpx")
# Read by the libraries when they are imported: set before the job's imports, so even the first
# messages (and the "Loading weights" bars) stay quiet. A value the user set wins.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_NO_ADVISORY_WARNINGS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}
_state = {"verbose": False}


class _TqdmHandler(logging.Handler):
    """Writes records with ``tqdm.write``: a message never breaks an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose`` (any job takes it), and whether it was there."""
    rest = [a for a in argv if a not in ("--verbose", "--verbose=true")]
    return rest, len(rest) != len(argv)


def setup(verbose: bool = False) -> None:
    """Show difflora's INFO messages on stderr; silence the libraries unless ``verbose``.

    Idempotent; a later call with ``verbose=True`` turns the libraries back on (``--verbose`` may
    be seen only when a job parses its flags), a later quiet call never silences a verbose run.
    """
    log = logging.getLogger("difflora")
    if not any(getattr(h, "_difflora", False) for h in log.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(_Formatter())
        handler._difflora = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    _state["verbose"] = _state["verbose"] or verbose
    if _state["verbose"]:
        _libraries_verbose()
    else:
        _libraries_quiet()


def _libraries_quiet() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"difflora(\.|$)")  # inserted first: difflora's own stay on
    _library_calls(quiet=True)


def _libraries_verbose() -> None:
    for key, value in QUIET_ENV.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET)
    warnings.resetwarnings()
    _library_calls(quiet=False)


def _library_calls(quiet: bool) -> None:
    """Apply the setting to libraries imported already (their environment variables are read once)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error() if quiet else tlog.set_verbosity_warning()
        tlog.disable_progress_bar() if quiet else tlog.enable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error() if quiet else dlog.set_verbosity_warning()
        dlog.disable_progress_bar() if quiet else dlog.enable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
        from huggingface_hub.utils import logging as hlog

        hlog.set_verbosity_error() if quiet else hlog.set_verbosity_warning()
        disable_progress_bars() if quiet else enable_progress_bars()


def quiet_again() -> None:
    """Re-apply the quiet setting after the libraries were imported (a job's imports come after
    :func:`setup`, and some libraries reset their own loggers when imported)."""
    if not _state["verbose"] and logging.getLogger("difflora").handlers:
        _libraries_quiet()


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def trainable_parts(named: dict[str, Any]) -> dict[str, int]:
    """Trainable parameter counts per part: UNet, each text encoder (by its name), token embeddings."""
    parts: dict[str, int] = {}
    for name, p in named.items():
        head = name.split(".", 1)[0]
        if "embedding" in name and "lora_" not in name:
            part = "token embeddings"
        elif head == "unet":
            part = "UNet"
        else:
            part = head
        parts[part] = parts.get(part, 0) + p.numel()
    return parts


def run_summary(trainer: Any, streams: list[Any]) -> str:
    """The start-of-run summary: data, what trains (per part), steps, batch, precision, optimizer, output."""
    cfg, acc = trainer.cfg, trainer.accelerator
    names = ("instance", "class")
    data = ", ".join(f"{len(s.images)} {names[i] if i < len(names) else f'stream {i}'} images"
                     + (f" (loss weight {s.weight:g})" if s.weight != 1 else "") for i, s in enumerate(streams))
    parts = trainable_parts(trainer.trainable)
    total = sum(parts.values())
    trained = ", ".join(f"{part} {n:,}" for part, n in parts.items())
    effective = cfg.train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    groups = trainer.optimizer.param_groups
    lrs = ", ".join(f"{g['lr']:.2g}" for g in groups)
    precision = acc.mixed_precision if acc.mixed_precision != "no" else "fp32"
    lines = [
        f"{trainer.job.name}: {cfg.pretrained_model_name_or_path} ({trainer.base.family.name}) on {trainer.device}",
        f"  data: {data}, {cfg.resolution} px",
        f"  trainable parameters: {total:,} ({trained})",
        f"  steps: {trainer.max_steps} (from step {trainer.step}), effective batch {effective} "
        f"= {cfg.train_batch_size} per process x {cfg.gradient_accumulation_steps} accumulation x "
        f"{acc.num_processes} process(es)",
        f"  precision: {precision} (trainable weights fp32), optimizer: {cfg.optimizer}, lr {lrs}, "
        f"schedule {cfg.lr_scheduler}",
        f"  output: {trainer.out}" + (f", trackers: {cfg.report_to} in {trainer.out / cfg.logging_dir}"
                                      if cfg.report_to != "none" else ""),
    ]
    return "\n".join(lines)
