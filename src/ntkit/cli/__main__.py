"""``python -m ntkit.cli ARGS`` runs the ``ntkit`` command (the same as the console script)."""
import sys

from . import main

sys.exit(main())
