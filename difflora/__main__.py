"""``python -m difflora`` is the ``difflora`` console command."""

from difflora.cli import main

main()
