"""Train one ED-LoRA concept: python mix_of_show/train_edlora.py --config configs/mix_of_show/tiny_edlora_robot.yaml"""

import sys

from difflora.errors import exit_on_user_error, import_job

if __name__ == "__main__":
    # Imported under the guard: Ctrl-C while torch loads is "interrupted" (exit 130), not a traceback.
    exit_on_user_error(lambda: import_job("difflora.mix_of_show.edlora").main(sys.argv[1:]),
                       prog="mix_of_show/train_edlora.py")
