"""DreamBooth LoRA training with the scaled optimizers (same flags as diffusers' script).

    python train_dreambooth.py --config configs/dreambooth/tiny.yaml
"""

from difflora.errors import exit_on_user_error


def _main() -> None:
    import sys

    if any(a in ("-h", "--help") for a in sys.argv[1:]):  # the options print without importing torch
        from difflora.cli import main as cli_main

        cli_main(["dreambooth", "--help"])
    from difflora.errors import import_job  # Ctrl-C during the import: exit 130, never an abort

    import_job("difflora.train.dreambooth").main()


if __name__ == "__main__":
    exit_on_user_error(_main, prog="train_dreambooth.py")
