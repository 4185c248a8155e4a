"""The version of emprune (one place; pyproject.toml reads the same number)."""
__version__ = "0.2.0"
