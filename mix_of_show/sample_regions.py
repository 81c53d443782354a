"""Regionally controlled sampling: python mix_of_show/sample_regions.py --model DIR --prompt ... --region ..."""

import sys

from difflora.errors import exit_on_user_error, import_job

if __name__ == "__main__":
    # Imported under the guard: Ctrl-C while torch loads is "interrupted" (exit 130), not a traceback.
    exit_on_user_error(lambda: import_job("difflora.mix_of_show.regions").main(sys.argv[1:]),
                       prog="mix_of_show/sample_regions.py")
