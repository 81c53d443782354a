"""Rebuild the toy world's pretrained models from their seed.

    python scripts/pretrain_toy.py clip --out assets/toy-clip [--max-minutes 30 --seed 0 ...]

Every flag of :class:`difflora.toy.pretrain.ClipPretrainConfig` is accepted.
"""

import sys

from difflora.errors import exit_on_user_error


def _main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("clip",):
        print("usage: python scripts/pretrain_toy.py clip --out assets/toy-clip [--key value ...]", file=sys.stderr)
        sys.exit(2)
    from difflora.toy.pretrain import main

    main(argv[1:])


if __name__ == "__main__":
    exit_on_user_error(lambda: _main(sys.argv[1:]), prog="pretrain_toy.py")
