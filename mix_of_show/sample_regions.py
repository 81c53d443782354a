"""Regionally controlled sampling: python mix_of_show/sample_regions.py --model DIR --prompt ... --region ..."""

import sys

from difflora.errors import exit_on_user_error
from difflora.mix_of_show.regions import main

if __name__ == "__main__":
    exit_on_user_error(lambda: main(sys.argv[1:]), prog="mix_of_show/sample_regions.py")
