"""Fuse several concept LoRAs into one model: python mix_of_show/fuse.py --concepts FILE.yaml ..."""

import sys

from difflora.errors import exit_on_user_error
from difflora.mix_of_show.fuse import main

if __name__ == "__main__":
    exit_on_user_error(lambda: main(sys.argv[1:]), prog="mix_of_show/fuse.py")
