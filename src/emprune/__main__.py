"""``python -m emprune``: the command-line interface (same as the ``emprune`` command)."""
from .cli.main import main

raise SystemExit(main())
