"""``python -m ntkit ARGS`` runs the ``ntkit`` command (the same as the console script)."""
import sys

from .cli import main

sys.exit(main())
