"""Rebuild the toy world's pretrained models from their seed.

    python scripts/pretrain_toy.py clip --out assets/toy-clip [--max-minutes 30 --seed 0 ...]
    python scripts/pretrain_toy.py sd --out assets/toy-sd [--clip assets/toy-clip --max-minutes 60 ...]

Every field of :class:`difflora.toy.pretrain.ClipPretrainConfig` (``clip``) or
:class:`difflora.toy.pretrain_sd.SDPretrainConfig` (``sd``) is a flag. Build the CLIP first: the
toy Stable Diffusion uses its text tower as its frozen text encoder.
"""

import sys

from difflora.errors import exit_on_user_error


def _main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("clip", "sd"):
        print("usage: python scripts/pretrain_toy.py clip|sd --out DIR [--key value ...]", file=sys.stderr)
        sys.exit(2)
    if argv[0] == "clip":
        from difflora.toy.pretrain import main
    else:
        from difflora.toy.pretrain_sd import main
    main(argv[1:])


if __name__ == "__main__":
    exit_on_user_error(lambda: _main(sys.argv[1:]), prog="pretrain_toy.py")
