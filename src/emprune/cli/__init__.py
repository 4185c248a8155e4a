"""The ``emprune`` command line (``python -m emprune``, ``python -m emprune.cli``): see :mod:`.main`."""
from .main import build_parser, main

__all__ = ["main", "build_parser"]
