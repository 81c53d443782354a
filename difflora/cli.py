"""The ``difflora`` console command: one subcommand per job.

Each subcommand lives in the module that owns the job and exposes ``main(argv)``; this file only
dispatches, so importing it stays cheap and ``difflora --help`` is instant. A job whose module
imports torch names its options class in :data:`LIGHT_HELP`, so ``difflora <job> --help`` prints
from that class alone, before torch or diffusers are imported.
"""

from __future__ import annotations

import importlib
import sys

from difflora.errors import exit_on_user_error, import_job

# name -> (module path, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "dreambooth": ("difflora.train.dreambooth", "train a DreamBooth LoRA (SD 1.x / 2.x / SDXL)"),
    "sample": ("difflora.sampling", "sample a base model with LoRAs into images, a grid and a manifest"),
    "eval": ("difflora.evaluation", "score images: CLIP-T, CLIP-I, DINO"),
    "sweep": ("difflora.sweep", "train, sample and score over optimizers x learning rates x seeds"),
    "edlora": ("difflora.mix_of_show.edlora", "Mix-of-Show: train one ED-LoRA concept"),
    "fuse": ("difflora.mix_of_show.fuse", "Mix-of-Show: fuse many concepts into one model"),
    "sample-regions": ("difflora.mix_of_show.regions", "Mix-of-Show: regionally controlled sampling"),
    "make-tiny-model": ("difflora.tiny_models", "write a tiny offline Stable Diffusion (+ CLIP) folder"),
    "demo": ("difflora.demo", "the README's main job: train the shipped concept, write samples"),
}


# name -> "module:class" of options that import no torch / diffusers (the job's --help prints from it).
LIGHT_HELP: dict[str, str] = {
    "dreambooth": "difflora.train.dreambooth_config:DreamBoothConfig",
}


def _usage() -> str:
    lines = ["usage: difflora [--version] <command> [options]", "", "commands:"]
    width = max(len(n) for n in SUBCOMMANDS)
    for name, (_, desc) in SUBCOMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {desc}")
    lines.append("")
    lines.append("Run 'difflora <command> --help' for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from difflora import __version__

        print(f"difflora {__version__}")
        raise SystemExit(0)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"difflora: error: unknown command '{name}'; valid commands: {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        raise SystemExit(2)
    if name in LIGHT_HELP and any(a in ("-h", "--help") for a in rest):
        from difflora.config import format_help

        module, cls = LIGHT_HELP[name].split(":")
        print(format_help(getattr(importlib.import_module(module), cls), f"difflora {name}"))
        raise SystemExit(0)
    from difflora import console

    rest, verbose = console.pop_verbose(rest)
    console.setup(verbose)  # before the job's imports: library chatter off unless --verbose
    # The import is inside the guard too: it takes seconds (torch, diffusers), and Ctrl-C during it
    # is an interrupt like any other (one line, exit 130), not a traceback.
    exit_on_user_error(lambda: import_job(SUBCOMMANDS[name][0]).main(rest), prog=f"difflora {name}")


if __name__ == "__main__":
    main()
