"""Train one ED-LoRA concept: python mix_of_show/train_edlora.py --config configs/mix_of_show/tiny_edlora_robot.yaml"""

import sys

from difflora.errors import exit_on_user_error
from difflora.mix_of_show.edlora import main

if __name__ == "__main__":
    exit_on_user_error(lambda: main(sys.argv[1:]), prog="mix_of_show/train_edlora.py")
