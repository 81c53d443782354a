"""Fuse several concept LoRAs into one model: python mix_of_show/fuse.py --concepts FILE.yaml ..."""

import sys

from difflora.errors import exit_on_user_error, import_job

if __name__ == "__main__":
    # Imported under the guard: Ctrl-C while torch loads is "interrupted" (exit 130), not a traceback.
    exit_on_user_error(lambda: import_job("difflora.mix_of_show.fuse").main(sys.argv[1:]),
                       prog="mix_of_show/fuse.py")
