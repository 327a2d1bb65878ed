"""The ``forvalue`` command line: the command table and its commands (``main`` is the console script)."""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
