"""DreamBooth LoRA training with the scaled optimizers (same flags as diffusers' script).

    python train_dreambooth.py --config configs/dreambooth/tiny.yaml
"""

from difflora.errors import exit_on_user_error
from difflora.train.dreambooth import main

if __name__ == "__main__":
    exit_on_user_error(main, prog="train_dreambooth.py")
